//! Why the daemon refuses a request, as a type: the daemon decides what to answer by
//! matching it (a change refused because of a takeover becomes `moved`), and so does a
//! client reading the answer (a daemon that calls `takeover` a bad request predates
//! takeovers).
//!
//! On the wire a refusal is what it has always been, `{"reply":"error","message":"…"}` with
//! the sentence a person reads: shims and daemons of earlier versions read and send exactly
//! that during an upgrade, and refuse fields they do not know. The sentences of the
//! refusals a program acts on are read back into their variants ([`Refusal::from_wire`]);
//! every other sentence is carried as it is.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The sentence of [`Refusal::HandingOver`], as daemons of every version send it.
const HANDING_OVER: &str = "this daemon is handing its sockets over to a new process";

/// The sentence of [`Refusal::TakeoverUnderWay`].
const TAKEOVER_UNDER_WAY: &str = "another takeover is under way";

/// How the sentence of [`Refusal::BadRequest`] starts.
const BAD_REQUEST: &str = "bad request: ";

/// Why a request, or a change to the running mappings, is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The daemon is handing its sockets over to a new process and changes nothing until
    /// that one serves: ask again, of the new one. The daemon answers `moved` instead when
    /// it knows the new process's pid.
    HandingOver,
    /// A takeover was asked while another one is under way.
    TakeoverUnderWay,
    /// The request line is not a request this daemon reads (why, as serde said it): junk,
    /// or a request of a later version, such as `takeover` to a daemon without takeovers.
    BadRequest(String),
    /// Any other reason, for the person at the terminal or `docker run`.
    Other(String),
}

impl Refusal {
    /// The refusal a sentence on the wire says (what [`fmt::Display`] wrote).
    pub fn from_wire(message: String) -> Refusal {
        match message.as_str() {
            HANDING_OVER => Refusal::HandingOver,
            TAKEOVER_UNDER_WAY => Refusal::TakeoverUnderWay,
            m => match m.strip_prefix(BAD_REQUEST) {
                Some(why) => Refusal::BadRequest(why.to_string()),
                None => Refusal::Other(message),
            },
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::HandingOver => f.write_str(HANDING_OVER),
            Refusal::TakeoverUnderWay => f.write_str(TAKEOVER_UNDER_WAY),
            Refusal::BadRequest(why) => write!(f, "{BAD_REQUEST}{why}"),
            Refusal::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Refusal {}

/// The reasons the rest of the program gives as sentences (a bind that failed, a spec that
/// does not parse) are refusals as they stand.
impl From<String> for Refusal {
    fn from(message: String) -> Refusal {
        Refusal::Other(message)
    }
}

/// For callers that only say why (logs, exit messages).
impl From<Refusal> for String {
    fn from(refusal: Refusal) -> String {
        refusal.to_string()
    }
}

impl Serialize for Refusal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Refusal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Refusal, D::Error> {
        String::deserialize(d).map(Refusal::from_wire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each refusal reads back as itself from what it sends.
    #[test]
    fn refusals_round_trip_through_their_sentences() {
        for r in [
            Refusal::HandingOver,
            Refusal::TakeoverUnderWay,
            Refusal::BadRequest("unknown variant `takeover`".into()),
            Refusal::Other("8080/tcp is already mapped".into()),
        ] {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Refusal>(&json).unwrap(), r, "{json}");
        }
    }

    /// The sentences daemons of earlier versions send, byte for byte: they are the wire.
    #[test]
    fn the_sentences_are_those_sent_before() {
        assert_eq!(
            Refusal::HandingOver.to_string(),
            "this daemon is handing its sockets over to a new process"
        );
        assert_eq!(
            Refusal::TakeoverUnderWay.to_string(),
            "another takeover is under way"
        );
        let old = "bad request: unknown variant `takeover`, expected one of `ls`, `add`";
        assert!(matches!(
            Refusal::from_wire(old.into()),
            Refusal::BadRequest(why) if why.starts_with("unknown variant")
        ));
    }
}
