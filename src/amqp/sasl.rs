//! Server side of the SASL layer (AMQP 1.0 part 5.3): ANONYMOUS, PLAIN and
//! SCRAM-SHA-256 (the mechanism's arithmetic is in [`super::scram`]).
//!
//! [`SaslServer`] is a pure state machine: feed it each decoded SASL frame,
//! send the frame it returns, and stop when it reports a [`SaslResult`]. After
//! a rejection the connection writes the outcome and closes the socket.
//!
//! Invariants: exactly one `sasl-outcome` is produced per exchange and no
//! frame is accepted after it; a PLAIN response is length-checked against
//! [`MAX_PLAIN_RESPONSE_LEN`] before it is split; credentials are never logged
//! or kept beyond the [`Authenticator`] call.
//!
//! Does not: check credentials (the [`Authenticator`] does, and should compare
//! passwords in constant time), perform I/O, or offer SCRAM variants other
//! than SCRAM-SHA-256 without channel binding.

use fe2o3_amqp_types::sasl::{SaslChallenge, SaslCode, SaslMechanisms, SaslOutcome};
use serde_amqp::primitives::{Binary, Symbol};

use super::frame::SaslFrame;
use super::scram::{ScramCredential, ScramServer, MECHANISM_SCRAM_SHA_256};

pub const MECHANISM_ANONYMOUS: &str = "ANONYMOUS";
pub const MECHANISM_PLAIN: &str = "PLAIN";
/// RFC 4616: authzid, authcid and passwd are each at most 255 octets.
pub const MAX_PLAIN_FIELD_LEN: usize = 255;
/// Three fields and their two NUL separators.
pub const MAX_PLAIN_RESPONSE_LEN: usize = 3 * MAX_PLAIN_FIELD_LEN + 2;

/// Decides whether PLAIN credentials are good.
pub trait Authenticator {
    /// Whether `authcid` with `passwd` may act as `authzid` (`None`: as itself).
    fn check_plain(&self, authzid: Option<&str>, authcid: &str, passwd: &str) -> bool;

    /// The stored SCRAM-SHA-256 credential of `username`, if the user exists and has one.
    fn scram_credential(&self, _username: &str) -> Option<ScramCredential> {
        None
    }
}

/// SASL policy of a listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaslConfig {
    /// Offer and accept ANONYMOUS. Default false: every client authenticates.
    pub allow_anonymous: bool,
    /// Offer SCRAM-SHA-256 (the authenticator must hold stored credentials).
    pub scram: bool,
}

/// Who the client proved to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Anonymous,
    User {
        /// The identity to act as, when it differs from `authcid`.
        authzid: Option<String>,
        authcid: String,
    },
}

/// Why authentication failed; all are reported to the client as `auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    UnsupportedMechanism,
    MalformedResponse,
    BadCredentials,
}

/// How the exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaslResult {
    Authenticated(Identity),
    Rejected(RejectReason),
}

/// What to do after a frame: send `reply`; if `result` is set, SASL is over.
#[derive(Debug, Clone)]
pub struct SaslStep {
    pub reply: SaslFrame,
    pub result: Option<SaslResult>,
}

/// A frame the client must not send at this point: close the socket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SaslError {
    #[error("unexpected sasl-{frame} frame while {state}")]
    UnexpectedFrame {
        frame: &'static str,
        state: &'static str,
    },
}

#[derive(Debug, Clone)]
enum State {
    AwaitingInit,
    AwaitingPlainResponse,
    AwaitingScramFinal(Box<ScramServer>),
    Done,
}

impl State {
    fn describe(&self) -> &'static str {
        match self {
            Self::AwaitingInit => "awaiting sasl-init",
            Self::AwaitingPlainResponse | Self::AwaitingScramFinal(_) => "awaiting sasl-response",
            Self::Done => "done",
        }
    }
}

/// One connection's SASL exchange.
#[derive(Debug, Clone)]
pub struct SaslServer {
    config: SaslConfig,
    state: State,
}

impl SaslServer {
    pub fn new(config: SaslConfig) -> Self {
        Self {
            config,
            state: State::AwaitingInit,
        }
    }

    /// The `sasl-mechanisms` frame to send right after the SASL header.
    pub fn mechanisms(&self) -> SaslFrame {
        let mut names = vec![Symbol::from(MECHANISM_PLAIN)];
        if self.config.scram {
            names.insert(0, Symbol::from(MECHANISM_SCRAM_SHA_256));
        }
        if self.config.allow_anonymous {
            names.push(Symbol::from(MECHANISM_ANONYMOUS));
        }
        SaslFrame::Mechanisms(SaslMechanisms {
            sasl_server_mechanisms: names.into(),
        })
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Changes whether ANONYMOUS is accepted, e.g. once `sasl-init` named the tenant.
    pub fn set_allow_anonymous(&mut self, allow: bool) {
        self.config.allow_anonymous = allow;
    }

    /// Advances the exchange with one frame from the client.
    pub fn on_frame(
        &mut self,
        frame: SaslFrame,
        authenticator: &dyn Authenticator,
    ) -> Result<SaslStep, SaslError> {
        let state = std::mem::replace(&mut self.state, State::Done);
        match (state, frame) {
            (State::AwaitingInit, SaslFrame::Init(init)) => Ok(self.on_init(
                init.mechanism.as_str(),
                init.initial_response.as_deref().map(Vec::as_slice),
                authenticator,
            )),
            (State::AwaitingPlainResponse, SaslFrame::Response(response)) => {
                Ok(self.finish_plain(&response.response, authenticator))
            }
            (State::AwaitingScramFinal(scram), SaslFrame::Response(response)) => {
                Ok(self.finish_scram(&scram, &response.response))
            }
            (state, frame) => Err(SaslError::UnexpectedFrame {
                frame: frame_name(&frame),
                state: state.describe(),
            }),
        }
    }

    fn on_init(
        &mut self,
        mechanism: &str,
        initial_response: Option<&[u8]>,
        authenticator: &dyn Authenticator,
    ) -> SaslStep {
        match (mechanism, initial_response) {
            (MECHANISM_ANONYMOUS, _) if self.config.allow_anonymous => {
                // The optional trace token (RFC 4505) is ignored, never stored.
                self.finish(SaslResult::Authenticated(Identity::Anonymous))
            }
            (MECHANISM_PLAIN, Some(response)) => self.finish_plain(response, authenticator),
            (MECHANISM_SCRAM_SHA_256, Some(first)) if self.config.scram => {
                self.start_scram(first, authenticator)
            }
            (MECHANISM_PLAIN, None) => {
                // RFC 4422: a mechanism whose client speaks first gets an
                // empty challenge when the initial response was omitted.
                self.state = State::AwaitingPlainResponse;
                SaslStep {
                    reply: SaslFrame::Challenge(SaslChallenge {
                        challenge: Binary::from(Vec::new()),
                    }),
                    result: None,
                }
            }
            _ => self.finish(SaslResult::Rejected(RejectReason::UnsupportedMechanism)),
        }
    }

    fn finish_plain(&mut self, response: &[u8], authenticator: &dyn Authenticator) -> SaslStep {
        let result = match parse_plain(response) {
            Ok(credentials) => credentials.check(authenticator),
            Err(reason) => SaslResult::Rejected(reason),
        };
        self.finish(result)
    }

    fn start_scram(&mut self, first: &[u8], authenticator: &dyn Authenticator) -> SaslStep {
        match ScramServer::start(first, |user| authenticator.scram_credential(user)) {
            Ok((scram, server_first)) => {
                self.state = State::AwaitingScramFinal(Box::new(scram));
                SaslStep {
                    reply: SaslFrame::Challenge(SaslChallenge {
                        challenge: Binary::from(server_first.into_bytes()),
                    }),
                    result: None,
                }
            }
            Err(_) => self.finish(SaslResult::Rejected(RejectReason::MalformedResponse)),
        }
    }

    fn finish_scram(&mut self, scram: &ScramServer, client_final: &[u8]) -> SaslStep {
        match scram.finish(client_final) {
            Ok(server_final) => self.finish_with(
                SaslResult::Authenticated(Identity::User {
                    authzid: None,
                    authcid: scram.username().to_owned(),
                }),
                Some(server_final.into_bytes()),
            ),
            Err(super::scram::ScramFailure::BadProof) => {
                self.finish(SaslResult::Rejected(RejectReason::BadCredentials))
            }
            Err(_) => self.finish(SaslResult::Rejected(RejectReason::MalformedResponse)),
        }
    }

    fn finish(&mut self, result: SaslResult) -> SaslStep {
        self.finish_with(result, None)
    }

    fn finish_with(&mut self, result: SaslResult, additional_data: Option<Vec<u8>>) -> SaslStep {
        self.state = State::Done;
        let code = match result {
            SaslResult::Authenticated(_) => SaslCode::Ok,
            SaslResult::Rejected(_) => SaslCode::Auth,
        };
        SaslStep {
            reply: SaslFrame::Outcome(SaslOutcome {
                code,
                additional_data: additional_data.map(Binary::from),
            }),
            result: Some(result),
        }
    }
}

fn frame_name(frame: &SaslFrame) -> &'static str {
    match frame {
        SaslFrame::Mechanisms(_) => "mechanisms",
        SaslFrame::Init(_) => "init",
        SaslFrame::Challenge(_) => "challenge",
        SaslFrame::Response(_) => "response",
        SaslFrame::Outcome(_) => "outcome",
    }
}

/// A PLAIN message (RFC 4616), borrowed from the frame.
// Format: [authzid] NUL authcid NUL passwd
#[derive(Debug, PartialEq, Eq)]
struct PlainCredentials<'a> {
    authzid: Option<&'a str>,
    authcid: &'a str,
    passwd: &'a str,
}

impl PlainCredentials<'_> {
    fn check(&self, authenticator: &dyn Authenticator) -> SaslResult {
        if !authenticator.check_plain(self.authzid, self.authcid, self.passwd) {
            return SaslResult::Rejected(RejectReason::BadCredentials);
        }
        SaslResult::Authenticated(Identity::User {
            authzid: self.authzid.map(str::to_owned),
            authcid: self.authcid.to_owned(),
        })
    }
}

fn parse_plain(response: &[u8]) -> Result<PlainCredentials<'_>, RejectReason> {
    let malformed = RejectReason::MalformedResponse;
    if response.len() > MAX_PLAIN_RESPONSE_LEN {
        return Err(malformed);
    }
    let mut fields = response.split(|byte| *byte == 0);
    let (Some(authzid), Some(authcid), Some(passwd), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(malformed);
    };
    if authcid.is_empty() || passwd.is_empty() {
        return Err(malformed);
    }
    Ok(PlainCredentials {
        authzid: Some(plain_field(authzid)?).filter(|id| !id.is_empty()),
        authcid: plain_field(authcid)?,
        passwd: plain_field(passwd)?,
    })
}

fn plain_field(field: &[u8]) -> Result<&str, RejectReason> {
    if field.len() > MAX_PLAIN_FIELD_LEN {
        return Err(RejectReason::MalformedResponse);
    }
    std::str::from_utf8(field).map_err(|_| RejectReason::MalformedResponse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::sasl::{SaslInit, SaslResponse};

    /// Accepts alice/secret, and alice acting as "ops".
    struct Users;

    impl Authenticator for Users {
        fn check_plain(&self, authzid: Option<&str>, authcid: &str, passwd: &str) -> bool {
            authcid == "alice" && passwd == "secret" && matches!(authzid, None | Some("ops"))
        }
    }

    fn init(mechanism: &str, response: Option<&[u8]>) -> SaslFrame {
        SaslFrame::Init(SaslInit {
            mechanism: Symbol::from(mechanism),
            initial_response: response.map(|r| Binary::from(r.to_vec())),
            hostname: None,
        })
    }

    fn outcome_code(step: &SaslStep) -> SaslCode {
        let SaslFrame::Outcome(outcome) = &step.reply else {
            panic!("not an outcome: {:?}", step.reply);
        };
        outcome.code.clone()
    }

    fn server(allow_anonymous: bool) -> SaslServer {
        SaslServer::new(SaslConfig {
            allow_anonymous,
            scram: false,
        })
    }

    fn mechanism_names(server: &SaslServer) -> Vec<String> {
        let SaslFrame::Mechanisms(m) = server.mechanisms() else {
            panic!("not mechanisms");
        };
        m.sasl_server_mechanisms
            .0
            .iter()
            .map(|s| s.0.clone())
            .collect()
    }

    #[test]
    fn mechanisms_follow_config() {
        assert_eq!(mechanism_names(&server(false)), ["PLAIN"]);
        assert_eq!(mechanism_names(&server(true)), ["PLAIN", "ANONYMOUS"]);
    }

    #[test]
    fn plain_with_initial_response_authenticates() {
        let mut sasl = server(false);
        let step = sasl
            .on_frame(init("PLAIN", Some(b"\0alice\0secret")), &Users)
            .unwrap();
        assert_eq!(outcome_code(&step), SaslCode::Ok);
        assert_eq!(
            step.result,
            Some(SaslResult::Authenticated(Identity::User {
                authzid: None,
                authcid: "alice".into()
            }))
        );
        assert!(sasl.is_done());
    }

    #[test]
    fn plain_with_authzid_is_passed_to_the_authenticator() {
        let mut sasl = server(false);
        let step = sasl
            .on_frame(init("PLAIN", Some(b"ops\0alice\0secret")), &Users)
            .unwrap();
        assert!(matches!(
            step.result,
            Some(SaslResult::Authenticated(Identity::User { authzid: Some(ref z), .. })) if z == "ops"
        ));
        let mut sasl = server(false);
        let step = sasl
            .on_frame(init("PLAIN", Some(b"root\0alice\0secret")), &Users)
            .unwrap();
        assert_eq!(
            step.result,
            Some(SaslResult::Rejected(RejectReason::BadCredentials))
        );
    }

    #[test]
    fn wrong_password_is_rejected_with_auth_code() {
        let mut sasl = server(true);
        let step = sasl
            .on_frame(init("PLAIN", Some(b"\0alice\0guess")), &Users)
            .unwrap();
        assert_eq!(outcome_code(&step), SaslCode::Auth);
        assert_eq!(
            step.result,
            Some(SaslResult::Rejected(RejectReason::BadCredentials))
        );
        assert!(sasl.is_done());
    }

    #[test]
    fn plain_without_initial_response_gets_an_empty_challenge() {
        let mut sasl = server(false);
        let step = sasl.on_frame(init("PLAIN", None), &Users).unwrap();
        assert!(step.result.is_none());
        assert!(matches!(&step.reply, SaslFrame::Challenge(c) if c.challenge.is_empty()));
        let response = SaslFrame::Response(SaslResponse {
            response: Binary::from(b"\0alice\0secret".to_vec()),
        });
        let step = sasl.on_frame(response, &Users).unwrap();
        assert_eq!(outcome_code(&step), SaslCode::Ok);
    }

    #[test]
    fn anonymous_only_when_allowed() {
        let mut sasl = server(true);
        let step = sasl
            .on_frame(init("ANONYMOUS", Some(b"trace")), &Users)
            .unwrap();
        assert_eq!(
            step.result,
            Some(SaslResult::Authenticated(Identity::Anonymous))
        );

        let mut sasl = server(false);
        let step = sasl.on_frame(init("ANONYMOUS", None), &Users).unwrap();
        assert_eq!(outcome_code(&step), SaslCode::Auth);
        assert_eq!(
            step.result,
            Some(SaslResult::Rejected(RejectReason::UnsupportedMechanism))
        );
    }

    #[test]
    fn unknown_mechanism_is_rejected() {
        let mut sasl = server(true);
        let step = sasl
            .on_frame(init("SCRAM-SHA-256", Some(b"n,,n=x")), &Users)
            .unwrap();
        assert_eq!(
            step.result,
            Some(SaslResult::Rejected(RejectReason::UnsupportedMechanism))
        );
    }

    #[test]
    fn malformed_plain_responses_are_rejected() {
        let long = [b"\0".as_slice(), &[b'a'; 256], b"\0secret"].concat();
        let too_big = vec![b'a'; MAX_PLAIN_RESPONSE_LEN + 1];
        let cases: [&[u8]; 8] = [
            b"",
            b"alice",
            b"\0alice",
            b"\0\0secret",
            b"\0alice\0",
            b"\0alice\0secret\0extra",
            b"\0al\xffice\0secret",
            &long,
        ];
        for response in cases.iter().copied().chain([too_big.as_slice()]) {
            let mut sasl = server(false);
            let step = sasl
                .on_frame(init("PLAIN", Some(response)), &Users)
                .unwrap();
            assert_eq!(
                step.result,
                Some(SaslResult::Rejected(RejectReason::MalformedResponse)),
                "{response:?}"
            );
        }
    }

    #[test]
    fn frames_out_of_turn_are_errors() {
        let mut sasl = server(false);
        let response = SaslFrame::Response(SaslResponse {
            response: Binary::from(b"\0alice\0secret".to_vec()),
        });
        assert!(matches!(
            sasl.on_frame(response, &Users),
            Err(SaslError::UnexpectedFrame {
                frame: "response",
                ..
            })
        ));
        assert!(sasl.is_done());

        let mut sasl = server(false);
        sasl.on_frame(init("PLAIN", Some(b"\0alice\0secret")), &Users)
            .unwrap();
        assert!(matches!(
            sasl.on_frame(init("PLAIN", Some(b"\0alice\0secret")), &Users),
            Err(SaslError::UnexpectedFrame {
                frame: "init",
                state: "done"
            })
        ));
    }
}
