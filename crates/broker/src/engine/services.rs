//! The engine's side of the `$aws/...` service seam: which service a topic goes to,
//! and where the engine's events go.
//!
//! The services themselves live in `fleetcore-services` and know nothing of the broker;
//! they are handed in at start (see [`crate::Server::start_with_services`]). The host is
//! consulted only for topics that start with `$aws/`, after the publish was authorized,
//! so a broker without services, or a publish to any other topic, pays one prefix check.

use std::sync::Arc;

use fleetcore_core::service::{Event, Publisher, ServiceContext, TopicService};
use fleetcore_core::topic::{parse_filter, TopicLimits};

/// Why a service could not be installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("service {service}: filter {filter:?} does not start with $aws/")]
    NotReserved {
        service: &'static str,
        filter: String,
    },
    #[error("service {service}: filter {filter:?} is not a valid topic filter: {reason}")]
    BadFilter {
        service: &'static str,
        filter: String,
        reason: String,
    },
    #[error("services {first} and {second} both claim {filter:?}")]
    Overlap {
        first: &'static str,
        second: &'static str,
        filter: String,
    },
}

/// The installed services, and the filters each claims.
#[derive(Default)]
pub struct ServiceHost {
    services: Vec<Arc<dyn TopicService>>,
    /// (filter, index into `services`), in installation order.
    filters: Vec<(String, usize)>,
}

impl ServiceHost {
    /// Checks and installs `services`: every filter must be a valid filter under `$aws/`,
    /// and no filter may be claimed twice.
    pub fn new(
        services: Vec<Arc<dyn TopicService>>,
        limits: &TopicLimits,
    ) -> Result<ServiceHost, ServiceError> {
        let mut filters: Vec<(String, usize)> = Vec::new();
        for (i, s) in services.iter().enumerate() {
            for f in s.filters() {
                if !f.starts_with("$aws/") {
                    return Err(ServiceError::NotReserved {
                        service: s.name(),
                        filter: f,
                    });
                }
                if let Err(e) = parse_filter(&f, limits) {
                    return Err(ServiceError::BadFilter {
                        service: s.name(),
                        filter: f,
                        reason: e.to_string(),
                    });
                }
                if let Some((_, j)) = filters.iter().find(|(g, _)| *g == f) {
                    return Err(ServiceError::Overlap {
                        first: services[*j].name(),
                        second: s.name(),
                        filter: f,
                    });
                }
                filters.push((f, i));
            }
        }
        Ok(ServiceHost { services, filters })
    }

    /// The service for a publish to `topic`, if one claims it (the first installed
    /// wins when filters of two services match).
    pub fn find(&self, topic: &str) -> Option<&Arc<dyn TopicService>> {
        if self.filters.is_empty() || !topic.starts_with("$aws/") {
            return None;
        }
        self.filters
            .iter()
            .find(|(f, _)| fleetcore_core::topic::filter_matches(f, topic))
            .map(|(_, i)| &self.services[*i])
    }

    /// Tells every service what happened.
    pub fn emit(&self, ev: &Event, out: &Arc<dyn Publisher>) {
        for s in &self.services {
            s.on_event(ev, out);
        }
    }

    /// Hands every service the store, the loaded records and a publisher, once.
    pub fn start(&self, ctx: ServiceContext<'_>) {
        for s in &self.services {
            s.start(ServiceContext {
                store: ctx.store.clone(),
                records: ctx.records,
                publisher: ctx.publisher.clone(),
            });
        }
    }

    /// Hands every service a record another node stored.
    pub fn apply_stored(&self, kind: &str, key: &str, value: Option<&[u8]>, revision: u64) {
        for s in &self.services {
            s.apply_stored(kind, key, value, revision);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The installed services' names, for the start-up log.
    pub fn names(&self) -> Vec<&'static str> {
        self.services.iter().map(|s| s.name()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcore_core::service::{Handled, ServiceRequest};

    struct Fake(&'static str, Vec<&'static str>);
    impl TopicService for Fake {
        fn name(&self) -> &'static str {
            self.0
        }
        fn filters(&self) -> Vec<String> {
            self.1.iter().map(|s| s.to_string()).collect()
        }
        fn handle(&self, _: ServiceRequest<'_>, _: &Arc<dyn Publisher>) -> Handled {
            Handled::PassThrough
        }
    }

    fn host(services: Vec<Fake>) -> Result<ServiceHost, ServiceError> {
        let services = services
            .into_iter()
            .map(|s| Arc::new(s) as Arc<dyn TopicService>)
            .collect();
        ServiceHost::new(services, &TopicLimits::default())
    }

    #[test]
    fn a_topic_goes_to_the_service_whose_filter_matches() {
        let h = host(vec![
            Fake("shadow", vec!["$aws/things/+/shadow/#"]),
            Fake("jobs", vec!["$aws/things/+/jobs/#"]),
        ])
        .unwrap();
        let name = |t: &str| h.find(t).map(|s| s.name());
        assert_eq!(name("$aws/things/a/shadow/update"), Some("shadow"));
        assert_eq!(name("$aws/things/a/jobs/get"), Some("jobs"));
        assert_eq!(name("$aws/things/a/other"), None);
        assert_eq!(name("things/a/shadow/update"), None);
    }

    #[test]
    fn filters_outside_aws_bad_or_claimed_twice_are_refused() {
        assert!(matches!(
            host(vec![Fake("x", vec!["things/#"])]),
            Err(ServiceError::NotReserved { .. })
        ));
        assert!(matches!(
            host(vec![Fake("x", vec!["$aws/a/#/b"])]),
            Err(ServiceError::BadFilter { .. })
        ));
        assert!(matches!(
            host(vec![
                Fake("a", vec!["$aws/x/#"]),
                Fake("b", vec!["$aws/x/#"])
            ]),
            Err(ServiceError::Overlap { .. })
        ));
    }
}
