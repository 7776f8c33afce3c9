//! Message payloads that measure themselves: a magic, a sequence number, the device the
//! message is for (or from), and the send time on the machine's monotonic clock (shared by
//! every process on the machine), padded to the requested size.

/// `FCLT`: fleetcore load test.
pub const MAGIC: [u8; 4] = *b"FCLT";
/// magic (4) + seq (8) + device (4) + sent_ns (8).
pub const HEADER: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub seq: u64,
    pub device: u32,
    /// CLOCK_MONOTONIC nanoseconds when the message was sent.
    pub sent_ns: u64,
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process of this machine.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time of the calling thread, nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: as above; CLOCK_THREAD_CPUTIME_ID exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Appends a stamped payload of `size` bytes (at least [`HEADER`]) to `out`.
pub fn write(out: &mut Vec<u8>, stamp: Stamp, size: usize) {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&stamp.seq.to_be_bytes());
    out.extend_from_slice(&stamp.device.to_be_bytes());
    out.extend_from_slice(&stamp.sent_ns.to_be_bytes());
    let size = size.max(HEADER);
    out.resize(start + size, b'x');
}

/// Reads a stamp back; `None` for anything this tool did not send.
pub fn read(payload: &[u8]) -> Option<Stamp> {
    if payload.len() < HEADER || payload[..4] != MAGIC {
        return None;
    }
    let u64_at = |i: usize| u64::from_be_bytes(payload[i..i + 8].try_into().unwrap());
    Some(Stamp {
        seq: u64_at(4),
        device: u32::from_be_bytes(payload[12..16].try_into().unwrap()),
        sent_ns: u64_at(16),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_padding() {
        let stamp = Stamp {
            seq: u64::MAX - 3,
            device: 99_999,
            sent_ns: now_ns(),
        };
        let mut buf = Vec::new();
        write(&mut buf, stamp, 100);
        assert_eq!(buf.len(), 100);
        assert_eq!(read(&buf), Some(stamp));
        // Sizes under the header still carry the whole header.
        buf.clear();
        write(&mut buf, stamp, 1);
        assert_eq!(buf.len(), HEADER);
        assert_eq!(read(&buf), Some(stamp));
    }

    #[test]
    fn foreign_payloads_are_ignored() {
        assert_eq!(read(b"{\"poll\":60}"), None);
        assert_eq!(read(&[0u8; 64]), None);
        let mut buf = Vec::new();
        write(
            &mut buf,
            Stamp {
                seq: 1,
                device: 1,
                sent_ns: 1,
            },
            24,
        );
        assert_eq!(read(&buf[..23]), None);
    }

    #[test]
    fn clock_moves_forward() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a && a > 0);
    }
}
