//! What the platform counts for Prometheus (`GET /metrics` on the control
//! API): per service, cold starts and how long each phase took, thaws,
//! builds by result, and the instances by state at the time of the scrape.
//!
//! Names follow OpenTelemetry's FaaS conventions where one fits
//! (`faas.coldstarts` is `faas_coldstarts_total`, `faas.init_duration` is
//! `faas_init_duration_seconds`, the service is `faas_name`); the rest are
//! skiff's own, prefixed `skiff_`. Everything here changes a few times per
//! start or build; a thaw, which can come with every request, observes a
//! histogram its service holds (no lookup, no allocation).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use skiff_core::{ErrorKind, Phases};
use skiff_gateway::{Meters, DURATION_BUCKETS};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Service {
    faas_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StartPhase {
    faas_name: String,
    /// `sandbox_ready`, `process_started`, `port_listening`, `first_answer`.
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    faas_name: String,
    /// `built`, `reused` or `failed`.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceState {
    faas_name: String,
    /// `running`, `suspended` or `starting`.
    state: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Starts: a millisecond to a minute.
fn start_buckets() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

/// Thaws: from 10 µs to 100 ms.
fn thaw_buckets() -> Histogram {
    Histogram::new([
        0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1,
    ])
}

/// Builds: a second to half an hour.
fn build_buckets() -> Histogram {
    Histogram::new([1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0])
}

/// The platform's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    coldstarts: Family<Service, Counter>,
    init_duration: Histograms<Service>,
    start_phases: Histograms<StartPhase>,
    thaws: Histograms<Service>,
    builds: Family<Build, Counter>,
    build_duration: Histograms<Service>,
    instances: Family<InstanceState, Gauge>,
    /// Request records the request log had no room for.
    records_dropped: Counter,
    /// Held while the instance gauges are set and the text is made, so two
    /// scrapes at once do not mix.
    scrape: Mutex<()>,
    /// What the gateway's threads count, per request.
    gateway: Arc<Meters>,
    /// The instances' usage, as the last scrape read it.
    usage: Arc<Mutex<Vec<InstanceUsage>>>,
}

/// What one instance uses, read at the scrape from its groups.
#[derive(Debug, Clone)]
pub struct InstanceUsage {
    pub service: String,
    pub instance: String,
    /// CPU time used since it started.
    pub cpu: Duration,
    /// Memory used now, its `/tmp` included.
    pub memory: u64,
}

/// The instances' usage as the scrape read it.
#[derive(Debug, Default)]
struct UsageCollector(Arc<Mutex<Vec<InstanceUsage>>>);

impl Collector for UsageCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let usage = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let labels = |u: &InstanceUsage| {
            [
                ("faas_name", u.service.clone()),
                ("faas_instance", u.instance.clone()),
            ]
        };
        {
            let mut family = encoder.encode_descriptor(
                "skiff_instance_memory",
                "Memory an instance uses, its /tmp included (its memory cgroup)",
                Some(&Unit::Bytes),
                MetricType::Gauge,
            )?;
            for u in usage.iter() {
                let memory = i64::try_from(u.memory).unwrap_or(i64::MAX);
                ConstGauge::new(memory).encode(family.encode_family(&labels(u))?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "skiff_instance_cpu",
            "CPU time an instance has used since it started",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        for u in usage.iter() {
            ConstCounter::new(u.cpu.as_secs_f64()).encode(family.encode_family(&labels(u))?)?;
        }
        Ok(())
    }
}

/// The gateway's counts, added up at each scrape.
#[derive(Debug)]
struct GatewayCollector(Arc<Meters>);

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl Collector for GatewayCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snap = self.0.snapshot();
        let all = || {
            snap.services
                .iter()
                .map(|(name, c)| (Some(name.as_str()), c))
                .chain([(None, &snap.unrouted)])
        };
        // `faas_name` only where the request reached a service.
        let named = |name: Option<&str>, rest: Vec<(&'static str, String)>| {
            let mut labels: Vec<(&'static str, String)> = Vec::new();
            if let Some(name) = name {
                labels.push(("faas_name", name.to_string()));
            }
            labels.extend(rest);
            labels
        };
        {
            let mut family = encoder.encode_descriptor(
                "faas_invocations",
                "Requests through the gateway, by the status class of their answer (the gateway's own answers included)",
                None,
                MetricType::Counter,
            )?;
            for (name, counts) in all() {
                for (class, n) in CLASSES.iter().zip(counts.by_class) {
                    if n == 0 {
                        continue;
                    }
                    let labels = named(name, vec![("status_class", class.to_string())]);
                    ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "faas_invoke_duration",
                "From a request's head to its answer's, through the gateway (a streamed answer's body not included)",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (name, counts) in all() {
                if counts.count() == 0 {
                    continue;
                }
                let buckets: Vec<(f64, u64)> = DURATION_BUCKETS
                    .iter()
                    .copied()
                    .chain([f64::MAX])
                    .zip(counts.buckets)
                    .collect();
                let labels = named(name, vec![]);
                family
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(counts.sum, counts.count(), &buckets, None)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "skiff_gateway_refusals",
            "Requests the gateway answered itself, by reason (the x-skiff-error kind)",
            None,
            MetricType::Counter,
        )?;
        for (name, counts) in all() {
            for (kind, n) in ErrorKind::ALL.iter().zip(counts.refused) {
                if n == 0 {
                    continue;
                }
                let labels = named(name, vec![("reason", kind.as_str().to_string())]);
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let coldstarts = Family::<Service, Counter>::default();
        let init_duration = Histograms::<Service>::new_with_constructor(start_buckets);
        let start_phases = Histograms::<StartPhase>::new_with_constructor(start_buckets);
        let thaws = Histograms::<Service>::new_with_constructor(thaw_buckets);
        let builds = Family::<Build, Counter>::default();
        let build_duration = Histograms::<Service>::new_with_constructor(build_buckets);
        let instances = Family::<InstanceState, Gauge>::default();
        let records_dropped = Counter::default();
        let gateway = Meters::new();
        let mut registry = Registry::default();
        registry.register_collector(Box::new(GatewayCollector(gateway.clone())));
        let usage = Arc::new(Mutex::new(Vec::new()));
        registry.register_collector(Box::new(UsageCollector(usage.clone())));
        registry.register(
            "faas_coldstarts",
            "Instances started from nothing (to zero and back, scale-out, restarts)",
            coldstarts.clone(),
        );
        registry.register_with_unit(
            "faas_init_duration",
            "From the request to start an instance until its first answer to the health check",
            Unit::Seconds,
            init_duration.clone(),
        );
        registry.register_with_unit(
            "skiff_start_phase",
            "When each phase of a start was reached, counted from the request to start",
            Unit::Seconds,
            start_phases.clone(),
        );
        registry.register_with_unit(
            "skiff_thaw_duration",
            "Thawing a suspended instance for a request",
            Unit::Seconds,
            thaws.clone(),
        );
        registry.register(
            "skiff_builds",
            "Deploys by what their image took: built, reused, or a build that failed",
            builds.clone(),
        );
        registry.register_with_unit(
            "skiff_build_duration",
            "Builds that ran, failed ones too",
            Unit::Seconds,
            build_duration.clone(),
        );
        registry.register(
            "skiff_instances",
            "Instances by state at the time of the scrape",
            instances.clone(),
        );
        registry.register(
            "skiff_request_records_dropped",
            "Request records not kept: the request log fell behind the traffic",
            records_dropped.clone(),
        );
        Self {
            registry,
            records_dropped,
            coldstarts,
            init_duration,
            start_phases,
            thaws,
            builds,
            build_duration,
            instances,
            scrape: Mutex::new(()),
            gateway,
            usage,
        }
    }

    /// Where the gateway's threads count (`skiff_gateway::Meters`).
    pub(crate) fn gateway(&self) -> Arc<Meters> {
        self.gateway.clone()
    }

    /// `n` request records were dropped (`requests.rs`).
    pub(crate) fn request_records_dropped(&self, n: u64) {
        self.records_dropped.inc_by(n);
    }

    /// An instance of `service` started and answered its health check.
    pub(crate) fn started(&self, service: &str, phases: &Phases) {
        let name = || service.to_string();
        self.coldstarts
            .get_or_create(&Service { faas_name: name() })
            .inc();
        self.init_duration
            .get_or_create(&Service { faas_name: name() })
            .observe(phases.first_answer.as_secs_f64());
        for (phase, at) in [
            ("sandbox_ready", phases.sandbox_ready),
            ("process_started", phases.process_started),
            ("port_listening", phases.port_listening),
            ("first_answer", phases.first_answer),
        ] {
            self.start_phases
                .get_or_create(&StartPhase {
                    faas_name: name(),
                    phase,
                })
                .observe(at.as_secs_f64());
        }
    }

    /// Where `service`'s thaws are observed: kept by the service, since a
    /// thaw can come with every request (`idle_suspend = "0s"`).
    pub(crate) fn thaws_of(&self, service: &str) -> Histogram {
        self.thaws
            .get_or_create(&Service {
                faas_name: service.to_string(),
            })
            .clone()
    }

    /// A deploy of `service` got its image: `built` in `took`, `reused`, or
    /// `failed` after `took`.
    pub(crate) fn build(&self, service: &str, result: &'static str, took: Option<Duration>) {
        self.builds
            .get_or_create(&Build {
                faas_name: service.to_string(),
                result,
            })
            .inc();
        if let Some(took) = took {
            self.build_duration
                .get_or_create(&Service {
                    faas_name: service.to_string(),
                })
                .observe(took.as_secs_f64());
        }
    }

    /// A removed service's series go with it.
    pub(crate) fn forget(&self, service: &str) {
        self.gateway.forget(service);
        let one = Service {
            faas_name: service.to_string(),
        };
        self.coldstarts.remove(&one);
        self.init_duration.remove(&one);
        self.thaws.remove(&one);
        self.build_duration.remove(&one);
        for phase in [
            "sandbox_ready",
            "process_started",
            "port_listening",
            "first_answer",
        ] {
            self.start_phases.remove(&StartPhase {
                faas_name: service.to_string(),
                phase,
            });
        }
        for result in ["built", "reused", "failed"] {
            self.builds.remove(&Build {
                faas_name: service.to_string(),
                result,
            });
        }
    }

    /// The text exposition (OpenMetrics 1.0, ending in `# EOF`), with each service's instances by state
    /// (`running`, `suspended`, `starting`) as `instances` gives them.
    pub fn encode(
        &self,
        instances: &[(String, [(&'static str, usize); 3])],
        usage: Vec<InstanceUsage>,
    ) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        *self.usage.lock().unwrap_or_else(|p| p.into_inner()) = usage;
        self.instances.clear();
        for (service, states) in instances {
            for &(state, n) in states {
                self.instances
                    .get_or_create(&InstanceState {
                        faas_name: service.clone(),
                        state,
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phases(ms: u64) -> Phases {
        Phases {
            sandbox_ready: Duration::from_micros(200),
            process_started: Duration::from_micros(600),
            port_listening: Duration::from_millis(ms - 1),
            first_answer: Duration::from_millis(ms),
        }
    }

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn starts_thaws_builds_and_instances_are_exposed_by_service() {
        let m = Metrics::new();
        m.started("api", &phases(40));
        m.started("api", &phases(60));
        m.thaws_of("api")
            .observe(Duration::from_micros(80).as_secs_f64());
        m.build("api", "built", Some(Duration::from_secs(3)));
        m.build("web", "reused", None);
        let gateway = m.gateway().for_thread();
        gateway.answered(Some("api"), 200, Duration::from_millis(2), None, None);
        gateway.answered(Some("api"), 201, Duration::from_millis(20), None, None);
        gateway.answered(
            Some("api"),
            504,
            Duration::from_secs(30),
            Some(ErrorKind::RequestTimeout),
            None,
        );
        gateway.answered(
            None,
            404,
            Duration::ZERO,
            Some(ErrorKind::UnknownService),
            None,
        );
        let count = [("running", 1), ("suspended", 2), ("starting", 0)];
        let usage = vec![InstanceUsage {
            service: "api".into(),
            instance: "api-1-2".into(),
            cpu: Duration::from_millis(1500),
            memory: 12 << 20,
        }];
        let text = m.encode(&[("api".into(), count)], usage);
        assert_eq!(
            line(&text, "faas_coldstarts_total{faas_name=\"api\"}"),
            Some("faas_coldstarts_total{faas_name=\"api\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("faas_init_duration_seconds_bucket{le=\"0.05\",faas_name=\"api\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("faas_init_duration_seconds_count{faas_name=\"api\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "skiff_start_phase_seconds_count{faas_name=\"api\",phase=\"port_listening\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("skiff_thaw_duration_seconds_bucket{le=\"0.0001\",faas_name=\"api\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("skiff_builds_total{faas_name=\"web\",result=\"reused\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("skiff_build_duration_seconds_sum{faas_name=\"api\"} 3.0"),
            "{text}"
        );
        assert!(
            text.contains("skiff_instances{faas_name=\"api\",state=\"suspended\"} 2"),
            "{text}"
        );
        for expected in [
            "faas_invocations_total{faas_name=\"api\",status_class=\"2xx\"} 2",
            "faas_invocations_total{faas_name=\"api\",status_class=\"5xx\"} 1",
            "faas_invocations_total{status_class=\"4xx\"} 1",
            "faas_invoke_duration_seconds_bucket{le=\"0.0025\",faas_name=\"api\"} 1",
            "faas_invoke_duration_seconds_bucket{le=\"+Inf\",faas_name=\"api\"} 3",
            "faas_invoke_duration_seconds_count{faas_name=\"api\"} 3",
            "skiff_gateway_refusals_total{faas_name=\"api\",reason=\"request-timeout\"} 1",
            "skiff_gateway_refusals_total{reason=\"unknown-service\"} 1",
            "skiff_instance_memory_bytes{faas_name=\"api\",faas_instance=\"api-1-2\"} 12582912",
            "skiff_instance_cpu_seconds_total{faas_name=\"api\",faas_instance=\"api-1-2\"} 1.5",
        ] {
            assert!(text.contains(expected), "{expected} in\n{text}");
        }
        // A service gone from the scrape's list is gone from the gauges;
        // a removed one from everything.
        let text = m.encode(&[], vec![]);
        assert!(!text.contains("skiff_instances{"), "{text}");
        assert!(!text.contains("faas_instance"), "{text}");
        m.forget("api");
        let text = m.encode(&[], vec![]);
        assert!(!text.contains("faas_name=\"api\""), "{text}");
        assert!(text.contains("faas_name=\"web\""), "{text}");
    }
}
