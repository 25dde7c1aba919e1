//! End-to-end tests of the broker: the real binary on loopback (the cluster scenarios of
//! issue 7 with each node in its own network namespace, see `netns`), driven by fe2o3-amqp
//! clients (and raw sockets where the exact bytes matter). One test binary keeps link
//! times down; each module is one scenario family.

mod access;
mod address_group;
mod address_types;
mod addresses;
mod bench_tool;
mod campaign;
mod client;
mod cluster;
mod cluster_campaign;
mod cluster_interop;
mod cluster_lease;
mod cluster_membership;
mod cluster_netns;
mod cluster_settle;
mod cluster_support;
mod container;
mod crash;
mod disk_full;
mod elasticity;
mod expiry;
mod format_fixtures;
mod fuzz_replay;
mod garbage;
mod group_store;
mod harness;
mod hostile;
mod interop;
mod interop_fe2o3;
mod interop_proton;
mod jms_subscriptions;
mod large_messages;
mod manifests;
mod many_queues;
mod metrics;
mod netns;
mod outcomes;
mod plans;
mod ports;
mod power_loss;
mod proton_examples;
mod queues;
mod raw_client;
mod requirement;
mod router;
mod selectors_proton;
mod shutdown;
mod sync_policy;
mod sync_setting;
mod three_hosts;
mod tls;
mod topics;
mod topics_proton;
mod transactions;
