//! What goes out: acknowledgements in arrival order behind the store commits they wait
//! for, the outbound window (packet ids, in-flight deliveries), PUBLISH encoding and
//! the write buffer.

use super::*;

pub(super) type PendingAck = Pin<
    Box<dyn Future<Output = (AfterCommit, Result<(), fleetcore_core::storage::StoreError>)> + Send>,
>;

/// Acknowledgements waiting for store commits, in arrival order. Made on first
/// use (and boxed: 64 bytes inline): an empty `FuturesOrdered` already holds
/// two allocations (~150 bytes), and most connections (an idle device) never
/// wait for a commit.
#[derive(Default)]
pub(super) struct PendingAcks(pub(super) Option<Box<FuturesOrdered<PendingAck>>>);

impl PendingAcks {
    pub(super) fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|f| f.is_empty())
    }

    pub(super) fn push_back(&mut self, ack: PendingAck) {
        self.0
            .get_or_insert_with(|| Box::new(FuturesOrdered::new()))
            .push_back(ack);
    }

    /// The next acknowledgement whose commit completed (`None` when none wait).
    pub(super) async fn next(
        &mut self,
    ) -> Option<(AfterCommit, Result<(), fleetcore_core::storage::StoreError>)> {
        match &mut self.0 {
            Some(f) => f.next().await,
            None => None,
        }
    }
}

/// What to send once a store commit completes.
pub(super) enum AfterCommit {
    Puback(Pid, bool),
    Pubrec(Pid, bool),
    Suback(v5::Suback),
    /// An acknowledgement that needed no commit, queued behind ones that do,
    /// so acknowledgements leave in the order their publishes arrived.
    Ready(Box<Packet>, &'static str),
}

impl<S: Wire> Conn<S> {
    /// Sends an acknowledgement, after any still waiting for a commit.
    pub(super) fn send_ack(&mut self, packet: Packet, name: &'static str) {
        if self.pending.is_empty() {
            self.send(&packet, name);
        } else {
            self.pending.push_back(Box::pin(async move {
                (AfterCommit::Ready(Box::new(packet), name), Ok(()))
            }));
        }
    }

    /// The output buffer, taken from this thread's spare when the connection
    /// has none (it gives it back after each flush).
    pub(super) fn out_buf(&mut self) -> &mut BytesMut {
        if self.out.capacity() == 0 {
            self.out = spare::take_out();
        }
        &mut self.out
    }

    pub(super) fn send(&mut self, packet: &Packet, name: &'static str) {
        let version = self.version;
        let max = self.client_max_packet;
        match protocol::encode_within(version, packet, max, self.out_buf()) {
            Ok(Some(0)) => {}
            Ok(Some(_)) => m::packet_out(name),
            Ok(None) => {
                tracing::warn!(client_id = %self.session.client_id, packet = name, max, "not sent: larger than the client's maximum packet size")
            }
            Err(e) => {
                tracing::error!(error = %e, packet = name, "could not encode an outgoing packet")
            }
        }
    }

    /// Writes the buffer out. Each write call must make progress within
    /// [`WRITE_STALL`]: a slow client that keeps reading is not cut off, one
    /// that stopped reading is.
    /// Writes the output buffer out. A write that makes no progress for
    /// [`WRITE_STALL`] fails.
    pub(super) async fn flush(&mut self) -> Result<(), String> {
        let (mut written, mut stall) = (0, None);
        std::future::poll_fn(|cx| self.poll_flush_out(cx, &mut written, &mut stall)).await
    }

    /// [`Conn::flush`] by hand: an awaited write under a timeout kept a
    /// future of some 240 bytes in every connection's state; the stall timer
    /// is made only when a write has to wait, which most never do.
    pub(super) fn poll_flush_out(
        &mut self,
        cx: &mut std::task::Context<'_>,
        written: &mut usize,
        stall: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    ) -> std::task::Poll<Result<(), String>> {
        use std::task::Poll;
        loop {
            let stream = Pin::new(&mut self.stream);
            let r = if *written < self.out.len() {
                stream.poll_write(cx, &self.out[*written..]).map_ok(Some)
            } else {
                stream.poll_flush(cx).map_ok(|()| None)
            };
            match r {
                Poll::Ready(Ok(Some(0))) => {
                    return Poll::Ready(Err("connection closed while writing".into()))
                }
                Poll::Ready(Ok(Some(w))) => {
                    *written += w;
                    // Progress: the stall is measured from the next wait.
                    *stall = None;
                }
                Poll::Ready(Ok(None)) => break,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.to_string())),
                Poll::Pending => {
                    let timer =
                        stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL)));
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err("write stalled: the client is not reading".into()));
                    }
                    return Poll::Pending;
                }
            }
        }
        m::bytes_out(self.out.len());
        // An idle connection keeps no output buffer either; it is left to the
        // next connection this thread writes for, instead of freed here and
        // allocated again (and grown) for the next packet.
        spare::put_out(std::mem::take(&mut self.out));
        Poll::Ready(Ok(()))
    }

    pub(super) fn alloc_pid(&mut self) -> u16 {
        loop {
            let pid = self.next_pid;
            self.next_pid = self.next_pid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&pid) {
                return pid;
            }
        }
    }

    /// Encodes one outgoing PUBLISH. Returns false if the client's maximum
    /// packet size forbids it (the message is then dropped, as MQTT 5 says).
    pub(super) fn write_publish(&mut self, d: &Delivery, pid: Option<u16>, dup: bool) -> bool {
        let v5 = self.version.is_v5();
        // Outgoing topic aliases, when the client allows them: the first
        // copy on a topic names it, later ones send only the alias.
        let mut alias = None;
        let mut new_alias = false;
        let mut topic: &str = &d.msg.topic;
        if v5 && self.client_alias_max > 0 {
            let assigned = &mut self.aliases.get_or_insert_with(Default::default).outgoing;
            if let Some(&a) = assigned.get(&d.msg.topic) {
                alias = Some(a);
                topic = "";
            } else if assigned.len() < self.client_alias_max as usize {
                let a = assigned.len() as u16 + 1;
                assigned.insert(d.msg.topic.clone(), a);
                alias = Some(a);
                new_alias = true;
            }
        }
        let out = protocol::OutPublish {
            dup,
            qos: d.qos,
            pid: pid.unwrap_or(0),
            retain: d.retain,
            topic,
            payload: &d.msg.payload,
            properties: v5.then_some(&d.msg.properties),
            expiry: if v5 && d.msg.expires_at_ms.is_some() {
                d.msg.remaining_expiry(now_ms())
            } else {
                None
            },
            alias,
            subscription_ids: if v5 { &d.subscription_ids } else { &[] },
        };
        let version = self.version;
        if self.out.capacity() == 0 {
            self.out = spare::take_out();
        }
        let mark = self.out.len();
        let n = protocol::encode_publish(version, &out, &mut self.out);
        if n > self.client_max_packet {
            self.out.truncate(mark);
            if new_alias {
                // The client never learnt this alias.
                if let Some(a) = &mut self.aliases {
                    a.outgoing.remove(&d.msg.topic);
                }
            }
            m::dropped("client_max_packet_size");
            return false;
        }
        m::packet_out("publish");
        m::message_out(d.qos as u8);
        true
    }

    /// Moves queued deliveries into the write buffer while the in-flight
    /// window and the buffer allow.
    pub(super) fn pump(&mut self) {
        while self.inflight.len() < self.out_window && self.out.len() < OUT_HIGH_WATER {
            let next = {
                let mut st = self.session.state.lock();
                // Only the connection attached to the session takes from its queue.
                if st.conn.as_ref().map(|l| l.conn_id) != Some(self.conn_id) {
                    break;
                }
                st.queue.pop_front()
            };
            let Some(d) = next else { break };
            // The clock is read only for messages that can expire.
            if d.msg.expires_at_ms.is_some() && d.msg.is_expired(now_ms()) {
                m::dropped("expired");
                self.forget_stored(&d);
                continue;
            }
            if !self.authz.allows(Action::Receive, &d.msg.topic) {
                m::dropped("not_authorized");
                self.forget_stored(&d);
                continue;
            }
            if d.qos == QoS::Level0 {
                self.write_publish(&d, None, false);
                self.forget_stored(&d);
                continue;
            }
            let pid = self.alloc_pid();
            if self.write_publish(&d, Some(pid), false) {
                self.inflight.insert(
                    pid,
                    Inflight {
                        pid,
                        delivery: d,
                        state: InflightState::Published,
                    },
                );
            } else {
                self.forget_stored(&d);
            }
        }
    }

    /// Deletes the durable copy of a delivery that is done with.
    pub(super) fn forget_stored(&self, d: &Delivery) {
        if let Some(seq) = d.seq {
            self.hub.storage.sessions.submit_sessions_nowait(vec![
                fleetcore_core::storage::SessionOp::DeleteQueued {
                    client_id: self.session.client_id.to_string(),
                    seq,
                },
            ]);
        }
    }

    pub(super) fn after_commit(
        &mut self,
        after: AfterCommit,
        res: Result<(), fleetcore_core::storage::StoreError>,
    ) -> Result<(), Exit> {
        if let Err(e) = &res {
            tracing::error!(client_id = %self.session.client_id, error = %e, "store commit failed");
            if !self.version.is_v5() {
                // MQTT 3.1.1 has no negative acknowledgement: close, so the
                // client retries on a new connection instead of believing it.
                return Err(Exit::Refuse(
                    DisconnectReasonCode::UnspecifiedError,
                    format!("message could not be stored: {e}"),
                ));
            }
        }
        let reason = res
            .as_ref()
            .err()
            .map(|e| Arc::from(format!("message could not be stored: {e}")));
        match after {
            AfterCommit::Puback(pid, matched) => {
                self.awaiting_commit -= 1;
                let mut ack = v5::Puback::new(
                    pid,
                    match (&res, matched) {
                        (Err(_), _) => PubackReasonCode::UnspecifiedError,
                        (Ok(_), true) => PubackReasonCode::Success,
                        (Ok(_), false) => PubackReasonCode::NoMatchingSubscribers,
                    },
                );
                ack.properties.reason_string = reason.filter(|_| self.problem_info);
                self.send(&Packet::Puback(ack), "puback");
            }
            AfterCommit::Pubrec(pid, matched) => {
                let mut rec = v5::Pubrec::new(
                    pid,
                    match (&res, matched) {
                        (Err(_), _) => PubrecReasonCode::UnspecifiedError,
                        (Ok(_), true) => PubrecReasonCode::Success,
                        (Ok(_), false) => PubrecReasonCode::NoMatchingSubscribers,
                    },
                );
                if res.is_err() {
                    self.incoming_qos2.remove(&pid.value());
                }
                rec.properties.reason_string = reason.filter(|_| self.problem_info);
                self.send(&Packet::Pubrec(rec), "pubrec");
            }
            AfterCommit::Ready(packet, name) => self.send(&packet, name),
            AfterCommit::Suback(mut suback) => {
                if res.is_err() {
                    for code in suback.topics.iter_mut() {
                        *code = SubscribeReasonCode::UnspecifiedError;
                    }
                    suback.properties.reason_string = reason.filter(|_| self.problem_info);
                }
                self.send(&Packet::Suback(suback), "suback");
            }
        }
        Ok(())
    }

    pub(super) fn queue_retained(&self, retained: Vec<Delivery>) {
        let max = self.hub.config.limits.max_queued_messages;
        for d in retained {
            if let crate::session::Enqueued::Dropped(r) =
                self.session.enqueue(d, max, &*self.hub.storage.sessions)
            {
                m::dropped(r);
            }
        }
    }
}
