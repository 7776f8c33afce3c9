//! What comes in: each packet's handling (PUBLISH with topic aliases, authorization and
//! service dispatch; SUBSCRIBE with retained messages; UNSUBSCRIBE; acknowledgements).

use super::*;

/// The protocol error for an acknowledgement of the wrong kind for a message in flight.
fn wrong_ack(kind: &str, pid: u16, inf: &Inflight) -> Exit {
    let expected = match (inf.delivery.qos, inf.state) {
        (QoS::Level2, InflightState::Published) => "PUBREC",
        (QoS::Level2, InflightState::Released) => "PUBCOMP",
        _ => "PUBACK",
    };
    Exit::Refuse(
        DisconnectReasonCode::ProtocolError,
        format!("{kind} for packet id {pid}, which awaits {expected}"),
    )
}

/// A connection's MQTT 5 topic aliases, both ways.
#[derive(Default)]
pub(super) struct Aliases {
    /// Set by the client.
    pub(super) incoming: HashMap<u16, TopicName>,
    /// Assigned by us towards the client.
    pub(super) outgoing: HashMap<TopicName, u16>,
}

impl<S: Wire> Conn<S> {
    pub(super) fn handle(&mut self, packet: Packet, will: &mut Will) -> Result<(), Exit> {
        match packet {
            Packet::Publish(p) => self.on_publish(p),
            // An acknowledgement of the wrong kind for a message in flight (PUBACK for
            // QoS 2, PUBREC for QoS 1, PUBCOMP before PUBREL) is a protocol error
            // (MQTT 5 4.3, 4.13); one for an unknown packet id is not.
            Packet::Puback(a) => {
                let pid = a.pid.value();
                if let Some(inf) = self.inflight.get(&pid) {
                    if inf.delivery.qos != QoS::Level1 {
                        return Err(wrong_ack("PUBACK", pid, inf));
                    }
                    let inf = self.inflight.remove(&pid);
                    if let Some(inf) = inf {
                        self.forget_stored(&inf.delivery);
                    }
                }
                Ok(())
            }
            Packet::Pubrec(r) => {
                let pid = r.pid.value();
                if let Some(inf) = self.inflight.get(&pid) {
                    if inf.delivery.qos != QoS::Level2 {
                        return Err(wrong_ack("PUBREC", pid, inf));
                    }
                }
                let known = self
                    .inflight
                    .get(&pid)
                    .is_some_and(|i| i.delivery.qos == QoS::Level2);
                if !known {
                    self.send(
                        &Packet::Pubrel(v5::Pubrel::new(
                            r.pid,
                            v5::PubrelReasonCode::PacketIdentifierNotFound,
                        )),
                        "pubrel",
                    );
                    return Ok(());
                }
                if (r.reason_code as u8) >= 0x80 {
                    // The receiver refused it: the exchange ends here.
                    if let Some(inf) = self.inflight.remove(&pid) {
                        self.forget_stored(&inf.delivery);
                    }
                    return Ok(());
                }
                if let Some(inf) = self.inflight.get_mut(&pid) {
                    inf.state = InflightState::Released;
                }
                self.send(&Packet::Pubrel(v5::Pubrel::new_success(r.pid)), "pubrel");
                Ok(())
            }
            Packet::Pubcomp(c) => {
                let pid = c.pid.value();
                if let Some(inf) = self.inflight.get(&pid) {
                    if inf.state != InflightState::Released {
                        return Err(wrong_ack("PUBCOMP", pid, inf));
                    }
                }
                if self
                    .inflight
                    .get(&pid)
                    .is_some_and(|i| i.state == InflightState::Released)
                {
                    if let Some(inf) = self.inflight.remove(&pid) {
                        self.forget_stored(&inf.delivery);
                    }
                }
                Ok(())
            }
            Packet::Pubrel(r) => {
                let code = if self.incoming_qos2.remove(&r.pid.value()) {
                    v5::PubcompReasonCode::Success
                } else {
                    v5::PubcompReasonCode::PacketIdentifierNotFound
                };
                self.send(&Packet::Pubcomp(v5::Pubcomp::new(r.pid, code)), "pubcomp");
                Ok(())
            }
            Packet::Subscribe(s) => self.on_subscribe(s),
            Packet::Unsubscribe(u) => {
                self.on_unsubscribe(u);
                Ok(())
            }
            Packet::Pingreq => {
                self.send(&Packet::Pingresp, "pingresp");
                Ok(())
            }
            Packet::Disconnect(d) => {
                if let Some(new_expiry) = d.properties.session_expiry_interval {
                    if self.connect_expiry == 0 && new_expiry != 0 {
                        return Err(Exit::Refuse(
                            DisconnectReasonCode::ProtocolError,
                            "session expiry may not be set on DISCONNECT when CONNECT had 0".into(),
                        ));
                    }
                    let max = self.hub.config.session.max_expiry_secs;
                    self.session.state.lock().expiry_secs = new_expiry.min(max);
                }
                let with_will = d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage;
                if !with_will {
                    *will = None;
                }
                Err(Exit::ClientDisconnect { with_will })
            }
            Packet::Connect(_) => Err(Exit::Refuse(
                DisconnectReasonCode::ProtocolError,
                "a second CONNECT on one connection".into(),
            )),
            Packet::Auth(_) => Err(Exit::Refuse(
                DisconnectReasonCode::ProtocolError,
                "AUTH without enhanced authentication".into(),
            )),
            Packet::Connack(_) | Packet::Suback(_) | Packet::Unsuback(_) | Packet::Pingresp => {
                Err(Exit::Refuse(
                    DisconnectReasonCode::ProtocolError,
                    "a client may not send CONNACK, SUBACK, UNSUBACK or PINGRESP".into(),
                ))
            }
        }
    }

    pub(super) fn on_publish(&mut self, p: v5::Publish) -> Result<(), Exit> {
        let qos = p.qos_pid.qos();
        let pid = p.qos_pid.pid();
        let limits = &self.hub.config.limits;
        let topic = match p.properties.topic_alias {
            Some(alias) => {
                if alias == 0 || alias > limits.topic_alias_maximum {
                    return Err(Exit::Refuse(
                        DisconnectReasonCode::TopicAliasInvalid,
                        format!(
                            "topic alias {alias} is outside 1..={}",
                            limits.topic_alias_maximum
                        ),
                    ));
                }
                if p.topic_name.is_empty() {
                    match self.aliases.as_ref().and_then(|a| a.incoming.get(&alias)) {
                        Some(t) => t.clone(),
                        None => {
                            return Err(Exit::Refuse(
                                DisconnectReasonCode::ProtocolError,
                                format!("topic alias {alias} was never set"),
                            ))
                        }
                    }
                } else {
                    self.aliases
                        .get_or_insert_with(Default::default)
                        .incoming
                        .insert(alias, p.topic_name.clone());
                    p.topic_name
                }
            }
            None => p.topic_name,
        };
        if topic.is_empty() {
            return Err(Exit::Refuse(
                DisconnectReasonCode::ProtocolError,
                "PUBLISH with an empty topic name and no topic alias".into(),
            ));
        }
        if let Err(e) = validate_topic_name(&topic, &self.hub.topic_limits) {
            return match (pid, self.version.is_v5()) {
                (Some(pid), true) => {
                    self.nack(qos, pid, 0x90, format!("topic name: {e}"));
                    Ok(())
                }
                _ => Err(Exit::Refuse(
                    DisconnectReasonCode::TopicNameInvalid,
                    format!("topic name: {e}"),
                )),
            };
        }
        let allowed = self.authz.allows(Action::Publish, &topic)
            && (!p.retain || self.authz.allows(Action::RetainPublish, &topic));
        if !allowed {
            let why = format!(
                "not authorized to {} to {:?}",
                if p.retain {
                    "publish a retained message"
                } else {
                    "publish"
                },
                &*topic
            );
            tracing::info!(client_id = %self.session.client_id, reason = %why, "PUBLISH refused");
            return match (pid, self.version.is_v5()) {
                (Some(pid), true) => {
                    self.nack(qos, pid, 0x87, why);
                    Ok(())
                }
                // MQTT 3.1.1 cannot refuse a publish; like IoT Core, disconnect.
                _ => Err(Exit::Refuse(DisconnectReasonCode::NotAuthorized, why)),
            };
        }
        m::message_in(qos as u8);
        if let Some(pid) = pid {
            if qos == QoS::Level2 && self.incoming_qos2.contains(&pid.value()) {
                // A resend of a QoS 2 message already taken: acknowledge, don't route again.
                self.send_ack(Packet::Pubrec(v5::Pubrec::new_success(pid)), "pubrec");
                return Ok(());
            }
            // MQTT 5 clients were told the Receive Maximum and break it at their
            // peril; 3.1.1 clients cannot be told, so they are slowed down
            // instead (the read loop stops reading while commits are pending).
            if self.version.is_v5()
                && self.awaiting_commit + self.incoming_qos2.len()
                    >= limits.receive_maximum as usize
            {
                return Err(Exit::Refuse(
                    DisconnectReasonCode::ReceiveMaximumExceeded,
                    format!(
                        "more than {} unacknowledged QoS 1/2 publishes",
                        limits.receive_maximum
                    ),
                ));
            }
        }
        let msg = Message::from_publish(
            topic,
            p.payload,
            qos,
            p.retain,
            p.properties,
            self.session.id,
        );
        let routed = match self.hub.publish_from(msg, || self.requester()) {
            Ok(routed) => routed,
            Err((code, why)) => {
                tracing::info!(client_id = %self.session.client_id, reason = %why, "PUBLISH refused by a service");
                return match (pid, self.version.is_v5()) {
                    (Some(pid), true) => {
                        self.nack(qos, pid, code.code(), why);
                        Ok(())
                    }
                    _ => Err(Exit::Refuse(
                        DisconnectReasonCode::from_u8(code.code())
                            .unwrap_or(DisconnectReasonCode::NotAuthorized),
                        why,
                    )),
                };
            }
        };
        let matched = routed.matched > 0;
        match (qos, pid) {
            (QoS::Level1, Some(pid)) => match routed.commit {
                Some(commit) => {
                    self.awaiting_commit += 1;
                    self.pending.push_back(Box::pin(async move {
                        (AfterCommit::Puback(pid, matched), commit.await)
                    }));
                }
                None => {
                    let code = if matched {
                        PubackReasonCode::Success
                    } else {
                        PubackReasonCode::NoMatchingSubscribers
                    };
                    self.send_ack(Packet::Puback(v5::Puback::new(pid, code)), "puback");
                }
            },
            (QoS::Level2, Some(pid)) => {
                self.incoming_qos2.insert(pid.value());
                match routed.commit {
                    Some(commit) => self.pending.push_back(Box::pin(async move {
                        (AfterCommit::Pubrec(pid, matched), commit.await)
                    })),
                    None => {
                        let code = if matched {
                            PubrecReasonCode::Success
                        } else {
                            PubrecReasonCode::NoMatchingSubscribers
                        };
                        self.send_ack(Packet::Pubrec(v5::Pubrec::new(pid, code)), "pubrec");
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Who this connection is, for the services: the client id, the certificate id
    /// (the registered one a token stands for, with tokens), and the thing: the token's,
    /// or the client id when the certificate's CN is that name or that thing is
    /// attached to the certificate (IoT Core's `iot:Connection.Thing.ThingName`).
    pub(super) fn requester(&self) -> Requester {
        let client_id = self.session.client_id.clone();
        let thing = match (&self.token, &self.cert) {
            (Some(t), _) => Some(Arc::from(t.thing.as_str())),
            (None, Some(c))
                if c.subject_cn.as_deref() == Some(&*client_id)
                    || self.hub.registry.is_attached(&c.fingerprint, &client_id) =>
            {
                Some(client_id.clone())
            }
            _ => None,
        };
        Requester {
            client_id,
            thing,
            cert_id: self
                .cert
                .as_ref()
                .map(|c| Arc::from(c.fingerprint.as_str())),
        }
    }

    /// Refuses one QoS 1/2 publish with a reason code, keeping the connection.
    pub(super) fn nack(&mut self, qos: QoS, pid: Pid, code: u8, why: String) {
        let reason = self.problem_info.then(|| protocol::reason_string(&why));
        if qos == QoS::Level1 {
            let mut ack = v5::Puback::new(
                pid,
                PubackReasonCode::from_u8(code).unwrap_or(PubackReasonCode::UnspecifiedError),
            );
            ack.properties.reason_string = reason;
            self.send_ack(Packet::Puback(ack), "puback");
        } else {
            let mut rec = v5::Pubrec::new(
                pid,
                PubrecReasonCode::from_u8(code).unwrap_or(PubrecReasonCode::UnspecifiedError),
            );
            rec.properties.reason_string = reason;
            self.send_ack(Packet::Pubrec(rec), "pubrec");
        }
    }

    pub(super) fn on_subscribe(&mut self, s: v5::Subscribe) -> Result<(), Exit> {
        let limits = &self.hub.config.limits;
        let sub_id = s.properties.subscription_id.map(|v| v.value());
        if sub_id == Some(0) {
            return Err(Exit::Refuse(
                DisconnectReasonCode::ProtocolError,
                "subscription identifier 0".into(),
            ));
        }
        let mut codes = Vec::with_capacity(s.topics.len());
        let mut retained = Vec::new();
        let mut granted = Vec::new();
        for (i, (filter, o)) in s.topics.iter().enumerate() {
            if i >= limits.max_filters_per_subscribe {
                codes.push(SubscribeReasonCode::QuotaExceeded);
                continue;
            }
            let raw = filter.to_string();
            let parsed = match parse_filter(&raw, &self.hub.topic_limits) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(client_id = %self.session.client_id, filter = %raw, error = %e, "filter refused");
                    codes.push(SubscribeReasonCode::TopicFilterInvalid);
                    continue;
                }
            };
            if !self.authz.allows(Action::Subscribe, &raw) {
                tracing::info!(client_id = %self.session.client_id, filter = %raw, "SUBSCRIBE refused: not authorized");
                codes.push(SubscribeReasonCode::NotAuthorized);
                continue;
            }
            if parsed.group.is_some() && o.no_local {
                return Err(Exit::Refuse(
                    DisconnectReasonCode::ProtocolError,
                    "No Local on a shared subscription".into(),
                ));
            }
            let opts = SubOptions {
                qos: o.max_qos,
                no_local: o.no_local,
                retain_as_published: o.retain_as_published,
                retain_handling: o.retain_handling,
                subscription_id: sub_id,
            };
            let existed = {
                let mut st = self.session.state.lock();
                if !st.subscriptions.contains_key(&raw)
                    && st.subscriptions.len() >= limits.max_subscriptions_per_connection
                {
                    codes.push(SubscribeReasonCode::QuotaExceeded);
                    continue;
                }
                st.subscribe(raw.clone(), opts.clone())
            };
            self.hub.router.subscribe(
                &parsed.filter,
                parsed.group.as_deref(),
                self.session.id,
                SubEntry {
                    session: self.session.clone(),
                    opts: opts.clone(),
                    filter: parsed
                        .group
                        .is_some()
                        .then(|| Arc::from(parsed.filter.as_str())),
                },
            );
            if self.hub.has_services() {
                granted.push(raw.clone());
            }
            codes.push(match o.max_qos {
                QoS::Level0 => SubscribeReasonCode::GrantedQoS0,
                QoS::Level1 => SubscribeReasonCode::GrantedQoS1,
                QoS::Level2 => SubscribeReasonCode::GrantedQoS2,
            });
            let send_retained = parsed.group.is_none()
                && match o.retain_handling {
                    v5::RetainHandling::SendAtSubscribe => true,
                    v5::RetainHandling::SendAtSubscribeIfNotExist => !existed,
                    v5::RetainHandling::DoNotSend => false,
                };
            if send_retained {
                for msg in self.hub.retained_for(&parsed.filter) {
                    retained.push(Delivery {
                        qos: msg.qos.min(o.max_qos),
                        msg,
                        retain: true,
                        subscription_ids: sub_id.into_iter().collect(),
                        seq: None,
                    });
                }
            }
        }
        if self.hub.has_services() && !granted.is_empty() {
            self.hub.emit(Event::Subscribed {
                client: self.requester(),
                filters: granted,
                connection: self.conn_id,
                at_ms: now_ms(),
            });
        }
        let suback = v5::Suback::new(s.pid, codes);
        match self.hub.persist_session(&self.session) {
            Some(commit) => self.pending.push_back(Box::pin(async move {
                (AfterCommit::Suback(suback), commit.await)
            })),
            None => self.send(&Packet::Suback(suback), "suback"),
        }
        // Queued now, not after the SUBACK's commit: a newer retained message
        // published meanwhile must arrive after this snapshot, never before it.
        self.queue_retained(retained);
        Ok(())
    }

    pub(super) fn on_unsubscribe(&mut self, u: v5::Unsubscribe) {
        let mut codes = Vec::with_capacity(u.topics.len());
        let mut removed_filters = Vec::new();
        for filter in &u.topics {
            let raw = filter.to_string();
            let removed = self.session.state.lock().unsubscribe(&raw);
            if removed {
                if let Ok(p) = parse_filter(&raw, &self.hub.topic_limits) {
                    self.hub
                        .router
                        .unsubscribe(&p.filter, p.group.as_deref(), self.session.id);
                }
                if self.hub.has_services() {
                    removed_filters.push(raw);
                }
                codes.push(UnsubscribeReasonCode::Success);
            } else {
                codes.push(UnsubscribeReasonCode::NoSubscriptionExisted);
            }
        }
        if !removed_filters.is_empty() {
            self.hub.emit(Event::Unsubscribed {
                client: self.requester(),
                filters: removed_filters,
                connection: self.conn_id,
                at_ms: now_ms(),
            });
        }
        // Durability of an unsubscribe is not waited for: at worst a crash
        // brings back a subscription the client had dropped.
        drop(self.hub.persist_session(&self.session));
        self.send(
            &Packet::Unsuback(v5::Unsuback::new(u.pid, codes)),
            "unsuback",
        );
    }
}
