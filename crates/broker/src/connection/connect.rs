//! CONNECT: reading it under the deadline, authenticating the client (certificate or
//! token), negotiating the session's parameters, attaching the session, CONNACK.

use super::*;

/// A connection past CONNECT: attached to its session, CONNACK queued.
pub(super) struct Opened<S> {
    pub(super) conn: Conn<S>,
    pub(super) kick_rx: KickReceiver,
    pub(super) keep_alive: u16,
    pub(super) will: Will,
}

/// Reads and checks CONNECT, attaches the session and queues CONNACK (and any
/// resends); `None` when the connection was refused or went away.
pub(super) async fn open<S>(
    hub: &Arc<Hub>,
    mut stream: S,
    peer: &PeerInfo,
    connect_deadline: Instant,
) -> Option<Opened<S>>
where
    S: Wire,
{
    let max_packet = hub.config.limits.max_packet_size as usize;
    let mut inbuf = BytesMut::with_capacity(512);
    // ---- CONNECT ----
    let len = loop {
        match protocol::frame_len(&inbuf, max_packet) {
            Ok(Some(n)) => break n,
            Ok(None) => {}
            Err(e) => {
                tracing::info!(peer = %peer.addr, error = %e, "refused before CONNECT");
                m::connection_refused("bad_connect");
                return None;
            }
        }
        match tokio::time::timeout_at(connect_deadline, stream.read_buf(&mut inbuf)).await {
            Err(_) => {
                tracing::info!(peer = %peer.addr, "no CONNECT within the connect timeout; closing");
                m::connection_refused("connect_timeout");
                return None;
            }
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(_)) => {}
        }
    };
    let frame = inbuf.split_to(len);
    m::packet_in("connect", len);
    let version = match protocol::connect_version(&frame) {
        Ok(v) => v,
        Err(DecodeError::UnsupportedVersion(what)) => {
            tracing::info!(peer = %peer.addr, %what, "unsupported protocol version");
            // MQTT 3.1.1 3.1.4: answer 0x01 (unacceptable protocol version) and close.
            let _ = stream.write_all(&[0x20, 0x02, 0x00, 0x01]).await;
            let _ = stream.flush().await;
            m::connection_refused("protocol_version");
            return None;
        }
        Err(e) => {
            tracing::info!(peer = %peer.addr, error = %e, "bad first packet; closing");
            m::connection_refused("bad_connect");
            return None;
        }
    };
    let connect = match protocol::decode(version, &frame) {
        Ok(Packet::Connect(c)) => c,
        Ok(_) => return None,
        Err(e) => {
            tracing::info!(peer = %peer.addr, error = %e, "malformed CONNECT");
            if version.is_v5() {
                let code = match e.reason() {
                    DisconnectReasonCode::TopicNameInvalid => ConnectReasonCode::TopicNameInvalid,
                    DisconnectReasonCode::ProtocolError => ConnectReasonCode::ProtocolError,
                    DisconnectReasonCode::PayloadFormatInvalid => {
                        ConnectReasonCode::PayloadFormatInvalid
                    }
                    _ => ConnectReasonCode::MalformedPacket,
                };
                // The CONNECT could not be read, so neither could the client's
                // Maximum Packet Size: no Reason String, the smallest CONNACK.
                refuse_connect(&mut stream, version, code, &e.to_string(), 0).await;
            }
            m::connection_refused("bad_connect");
            return None;
        }
    };
    let setup = negotiate(hub, peer, version, connect, &mut stream).await?;
    // A CONNACK the client cannot take (its properties, an assigned client id, over
    // its Maximum Packet Size) is not sent: the connection is closed before the
    // session is touched. Its size does not depend on Session Present.
    {
        let mut probe = v5::Connack::new(false, ConnectReasonCode::Success);
        probe.properties = setup.connack_props.clone();
        probe.properties.session_expiry_interval = setup.told_expiry;
        let mut out = BytesMut::new();
        let fits = protocol::encode_within(
            version,
            &Packet::Connack(probe),
            setup.client_max_packet,
            &mut out,
        );
        if !matches!(fits, Ok(Some(_))) {
            tracing::info!(peer = %peer.addr, client_id = %setup.client_id, max = setup.client_max_packet, "CONNACK would exceed the client's maximum packet size; closing");
            m::connection_refused("connack_too_large");
            return None;
        }
    }
    let conn_id = hub.next_session_id();
    let attached = hub
        .attach(
            setup.client_id.clone(),
            setup.clean_start,
            setup.expiry_secs,
            version,
            conn_id,
            setup.cert_id.clone(),
        )
        .await;
    if let Some(cert_id) = &setup.cert_id {
        hub.track_certificate(cert_id, &attached.session, conn_id);
    }
    let mut conn = Conn {
        hub: hub.clone(),
        stream,
        version,
        session: attached.session.clone(),
        conn_id,
        inbuf,
        out: BytesMut::new(),
        inflight: BTreeMap::new(),
        next_pid: 1,
        out_window: setup.out_window,
        client_max_packet: setup.client_max_packet,
        incoming_qos2: attached.incoming_qos2,
        awaiting_commit: 0,
        aliases: None,
        client_alias_max: setup.client_alias_max,
        pending: PendingAcks::default(),
        problem_info: setup.problem_info,
        connect_expiry: setup.expiry_secs,
        authz: setup.authz,
        authz_gen: setup.authz_gen,
        cert: peer.cert.clone().or(setup.token_cert).map(Box::new),
        token: setup.token.map(Box::new),
    };
    if hub.has_services() {
        hub.emit(Event::Connected {
            client: conn.requester(),
            ip: peer.addr.ip().to_string(),
            version: conn_id,
            at_ms: now_ms(),
        });
    }
    let mut props = setup.connack_props;
    props.session_expiry_interval = setup.told_expiry;
    let connack = v5::Connack {
        session_present: attached.session_present,
        reason_code: ConnectReasonCode::Success,
        properties: props,
    };
    conn.send(&Packet::Connack(connack), "connack");
    tracing::info!(
        client_id = %setup.client_id,
        peer = %peer.addr,
        via = %peer.proxied_by.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
        listener = peer.listener,
        transport = peer.transport,
        protocol = version.level(),
        cn = peer.cert.as_ref().and_then(|c| c.subject_cn.as_deref()).unwrap_or("-"),
        clean_start = setup.clean_start,
        session_present = attached.session_present,
        keep_alive = setup.keep_alive,
        "client connected"
    );
    m::client_connected(
        peer.listener,
        peer.transport,
        match (&peer.cert, &conn.token) {
            (Some(_), _) => "certificate",
            (None, Some(_)) => "token",
            (None, None) => "none",
        },
    );
    // Resend what was in flight when the previous connection ended.
    for inf in attached.resend {
        match inf.state {
            InflightState::Published => {
                conn.write_publish(&inf.delivery, Some(inf.pid), true);
            }
            InflightState::Released => conn.send(
                &Packet::Pubrel(v5::Pubrel::new_success(
                    inf.pid.try_into().unwrap_or_default(),
                )),
                "pubrel",
            ),
        };
        conn.inflight.insert(inf.pid, inf);
    }
    Some(Opened {
        conn,
        kick_rx: attached.kick_rx,
        keep_alive: setup.keep_alive,
        will: setup.will.map(Box::new),
    })
}

/// Closes our side and reads (and discards) what the client still sends,
/// for a bounded time. Closing a socket with unread input makes the kernel
/// reset the connection, which can destroy the DISCONNECT just sent before
/// the client reads it.
pub(super) async fn linger<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    let mut scratch = [0u8; 2048];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(n) = stream.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

pub(super) async fn refuse_connect<S: AsyncWrite + Unpin>(
    stream: &mut S,
    version: Version,
    code: ConnectReasonCode,
    why: &str,
    client_max_packet: usize,
) {
    let mut ack = v5::Connack::new(false, code);
    if version.is_v5() {
        ack.properties.reason_string = Some(protocol::reason_string(why));
    }
    let mut out = BytesMut::new();
    // A CONNACK without its Reason String is 5 bytes: always sent.
    let max = client_max_packet.max(5);
    if let Ok(Some(_)) = protocol::encode_within(version, &Packet::Connack(ack), max, &mut out) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = stream.write_all(&out).await;
            let _ = stream.flush().await;
        })
        .await;
    }
}

/// What CONNECT negotiated.
pub(super) struct Setup {
    pub(super) client_id: Arc<str>,
    pub(super) clean_start: bool,
    pub(super) expiry_secs: u32,
    pub(super) told_expiry: Option<u32>,
    pub(super) keep_alive: u16,
    pub(super) out_window: usize,
    pub(super) client_max_packet: usize,
    pub(super) client_alias_max: u16,
    pub(super) problem_info: bool,
    pub(super) will: Option<(Message, u32)>,
    pub(super) connack_props: ConnackProperties,
    pub(super) authz: Authz,
    /// Registry generation the authorization was bound at (registry listeners).
    pub(super) authz_gen: Option<u64>,
    pub(super) cert_id: Option<Arc<str>>,
    /// The device token the client authenticated with, if it did.
    pub(super) token: Option<TokenClaims>,
    /// The registered certificate the token stands for.
    pub(super) token_cert: Option<ClientCert>,
}

/// Checks CONNECT and settles what the connection may do; refuses it with
/// the right CONNACK code otherwise.
pub(super) async fn negotiate<S: AsyncWrite + Unpin>(
    hub: &Hub,
    peer: &PeerInfo,
    version: Version,
    c: v5::Connect,
    stream: &mut S,
) -> Option<Setup> {
    let limits = &hub.config.limits;
    let refuse = |code: ConnectReasonCode, why: String| (code, why);
    // Just-in-time provisioning: an unknown certificate of a registered CA with a
    // template is provisioned before it is resolved, and this connection proceeds.
    let mut jit_refusal = None;
    if let (Some(der), Some(jit), Some(cert)) =
        (&peer.unregistered_cert_der, hub.jit.get(), &peer.cert)
    {
        if hub.registry.certificate_state(&cert.fingerprint).is_none() {
            if let Err(why) = jit.provision(der, &c.client_id).await {
                jit_refusal = Some(refuse(
                    ConnectReasonCode::NotAuthorized,
                    format!("just-in-time provisioning failed: {why}"),
                ));
            }
        }
    }
    let result: Result<Setup, (ConnectReasonCode, String)> = (|| {
        if let Some(r) = jit_refusal {
            return Err(r);
        }
        // A device token as the password, where the listener takes tokens and the
        // client came without a certificate (a certificate, when presented, decides).
        let token = match (&peer.cert, &c.password) {
            (None, Some(password)) if peer.tokens => {
                let claims = std::str::from_utf8(password)
                    .map_err(|_| "the password is not a device token".to_string())
                    .and_then(|t| hub.registry.verify_token(t).map_err(|e| e.to_string()))
                    .map_err(|why| refuse(ConnectReasonCode::BadUserNameOrPassword, why))?;
                // The AWS IoT Device SDKs send `thing?SDK=...&Platform=...` as the user
                // name (their metrics, on by default): the thing is what comes before `?`.
                let thing = c
                    .username
                    .as_deref()
                    .map(|u| u.split('?').next().unwrap_or(u));
                if thing != Some(claims.thing.as_str()) {
                    return Err(refuse(
                        ConnectReasonCode::BadUserNameOrPassword,
                        format!(
                            "the user name must be the token's thing name {:?}",
                            claims.thing
                        ),
                    ));
                }
                Some(claims)
            }
            _ => None,
        };
        // A resumed TLS session carries the certificate verified at its full
        // handshake; the registry check below applies to it as to any, and its
        // validity period is checked here (rustls did not look at it this time).
        if let Some(refusal) = peer
            .tls_resumed
            .and_then(|r| r.refusal(fleetcore_core::time::now_secs() as i64))
        {
            return Err(refuse(ConnectReasonCode::NotAuthorized, refusal));
        }
        // On a registry listener every client is someone in the registry: a
        // certificate or a token, never anonymous (whatever allow_anonymous says).
        if peer.cert.is_none() && token.is_none() && (!peer.allow_anonymous || peer.uses_registry) {
            return Err(refuse(
                ConnectReasonCode::NotAuthorized,
                if peer.tokens {
                    "this listener requires a client certificate or a device token (MQTT password, thing name as user name)".into()
                } else {
                    "this listener requires a client certificate".into()
                },
            ));
        }
        // MQTT 3.1 (3.1, CONNECT payload): the client id is 1 to 23 characters, and
        // CONNACK 2 (identifier rejected) answers any other.
        if version == Version::V31 && !(1..=23).contains(&c.client_id.chars().count()) {
            return Err(refuse(
                ConnectReasonCode::ClientIdentifierNotValid,
                "an MQTT 3.1 client id is 1 to 23 characters".into(),
            ));
        }
        let mut assigned = None;
        let client_id: Arc<str> = if c.client_id.is_empty() {
            if !version.is_v5() && !c.clean_start {
                return Err(refuse(
                    ConnectReasonCode::ClientIdentifierNotValid,
                    "an empty client id needs clean session".into(),
                ));
            }
            let id: Arc<str> = Arc::from(format!("fc-{:016x}", rand::random::<u64>()));
            assigned = Some(id.clone());
            id
        } else {
            c.client_id.clone()
        };
        if client_id.len() > limits.max_client_id_len {
            return Err(refuse(
                ConnectReasonCode::ClientIdentifierNotValid,
                format!(
                    "client id is {} bytes; the limit is {}",
                    client_id.len(),
                    limits.max_client_id_len
                ),
            ));
        }
        let mut authz_gen = None;
        let mut cert_id = None;
        let mut token_cert = None;
        let authz = match (&peer.cert, &peer.policy) {
            (None, _) if token.is_some() => {
                let claims = token.as_ref().expect("checked");
                authz_gen = Some(hub.registry.generation());
                cert_id = Some(Arc::from(claims.cert.as_str()));
                let (authz, cert) = hub
                    .registry
                    .resolve_token(claims, &client_id)
                    .map_err(|why| refuse(ConnectReasonCode::NotAuthorized, why.to_string()))?;
                token_cert = Some(cert);
                authz
            }
            (Some(cert), _) if peer.uses_registry => {
                // Read the generation first, so a change racing with this
                // connect is seen at the first check.
                authz_gen = Some(hub.registry.generation());
                cert_id = Some(Arc::from(cert.fingerprint.as_str()));
                hub.registry
                    .resolve(cert, &client_id)
                    .map_err(|why| refuse(ConnectReasonCode::NotAuthorized, why.to_string()))?
            }
            (_, Some(policy)) => Authz::bind(&[policy], &client_id, peer.cert.as_ref()),
            _ => Authz::AllowAll,
        };
        if !authz.allows(Action::Connect, &client_id) {
            return Err(refuse(
                ConnectReasonCode::NotAuthorized,
                format!("not authorized to connect as client id {client_id:?}"),
            ));
        }
        let p = &c.properties;
        if p.receive_max == Some(0) || p.max_packet_size == Some(0) {
            return Err(refuse(
                ConnectReasonCode::ProtocolError,
                "receive maximum and maximum packet size may not be 0".into(),
            ));
        }
        if p.auth_method.is_some() {
            return Err(refuse(
                ConnectReasonCode::BadAuthMethod,
                "enhanced authentication is not supported".into(),
            ));
        }
        let session_cfg = &hub.config.session;
        let (expiry_secs, told_expiry) = if version.is_v5() {
            let asked = p.session_expiry_interval.unwrap_or(0);
            let granted = asked.min(session_cfg.max_expiry_secs);
            (granted, (granted != asked).then_some(granted))
        } else if c.clean_start {
            (0, None)
        } else {
            (session_cfg.default_expiry_secs, None)
        };
        let mut connack_props = ConnackProperties::default();
        let max_ka = limits.max_keep_alive_secs;
        let keep_alive =
            if version.is_v5() && max_ka > 0 && (c.keep_alive > max_ka || c.keep_alive == 0) {
                connack_props.server_keep_alive = Some(max_ka);
                max_ka
            } else {
                c.keep_alive
            };
        if version.is_v5() {
            connack_props.receive_max = Some(limits.receive_maximum);
            connack_props.max_packet_size = Some(limits.max_packet_size);
            connack_props.topic_alias_max = Some(limits.topic_alias_maximum);
            connack_props.assigned_client_id = assigned;
        }
        let will = match c.last_will {
            None => None,
            Some(w) => {
                if let Err(e) = validate_topic_name(&w.topic_name, &hub.topic_limits) {
                    return Err(refuse(
                        ConnectReasonCode::TopicNameInvalid,
                        format!("will topic: {e}"),
                    ));
                }
                if !authz.allows(Action::Publish, &w.topic_name)
                    || (w.retain && !authz.allows(Action::RetainPublish, &w.topic_name))
                {
                    return Err(refuse(
                        ConnectReasonCode::NotAuthorized,
                        format!("not authorized to publish the will to {:?}", &*w.topic_name),
                    ));
                }
                let props = v5::PublishProperties {
                    payload_is_utf8: w.properties.payload_is_utf8,
                    message_expiry_interval: w.properties.message_expiry_interval,
                    topic_alias: None,
                    response_topic: w.properties.response_topic.clone(),
                    correlation_data: w.properties.correlation_data.clone(),
                    user_properties: w.properties.user_properties.clone(),
                    subscription_id: None,
                    content_type: w.properties.content_type.clone(),
                };
                // The origin is fixed when the will fires; 0 means "the broker".
                let msg = Message::from_publish(w.topic_name, w.payload, w.qos, w.retain, props, 0);
                Some((msg, w.properties.delay_interval.unwrap_or(0)))
            }
        };
        Ok(Setup {
            client_id,
            clean_start: c.clean_start,
            expiry_secs,
            told_expiry,
            keep_alive,
            out_window: (limits.max_inflight_out as usize)
                .min(p.receive_max.unwrap_or(u16::MAX) as usize),
            client_max_packet: p.max_packet_size.unwrap_or(u32::MAX) as usize,
            client_alias_max: p.topic_alias_max.unwrap_or(0),
            problem_info: p.request_problem_info.unwrap_or(true),
            will,
            connack_props,
            authz,
            authz_gen,
            cert_id,
            token,
            token_cert,
        })
    })();
    match result {
        Ok(s) => Some(s),
        Err((code, why)) => {
            tracing::info!(peer = %peer.addr, client_id = %c.client_id, reason = %why, "CONNECT refused");
            m::connection_refused("connect_refused");
            // MQTT 3.1/3.1.1 has no CONNACK code for a CONNECT that breaks the rules
            // (an invalid will topic, say): the connection is closed without one
            // (3.1.1 3.1.4, 4.8).
            let violation = matches!(
                code,
                ConnectReasonCode::TopicNameInvalid
                    | ConnectReasonCode::ProtocolError
                    | ConnectReasonCode::MalformedPacket
            );
            if version.is_v5() || !violation {
                let max = c.properties.max_packet_size.unwrap_or(u32::MAX) as usize;
                refuse_connect(stream, version, code, &why, max).await;
            }
            None
        }
    }
}
