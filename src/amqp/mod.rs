//! The AMQP 1.0 protocol layer of the broker, below connection state.
//!
//! Owns the wire: value measuring (`encoding`), framing and performatives
//! (`frame`; the message path's transfer, disposition and flow read by hand: `hot`), lazy views and rewrites of stored messages (`message`), fields of the
//! properties section read by hand (`properties`) and the
//! server side of SASL (`sasl`). Nothing here performs I/O or knows about
//! queues; the connection engine drives these pieces.
#![allow(dead_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod encoding;
pub mod frame;
pub mod hot;
pub mod message;
pub mod properties;
pub mod sasl;
pub mod scram;
