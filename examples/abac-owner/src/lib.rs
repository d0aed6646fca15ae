//! Example guest: attribute-based access control. A subject may act on a resource it owns, and
//! only within business hours (UTC).
//!
//! Input: `{"subject":{"id":"alice"},"resource":{"type":"orders","id":"7","owner":"alice"}}`,
//! or a forward-auth request whose `x-user` header is the subject and `x-resource-owner` header
//! the owner (a demo: a real deployment would look the owner up, not trust a header).
//!
//! The hours come from the environment variable `ABAC_BUSINESS_HOURS`, `"HH-HH"`: start hour
//! inclusive, end hour exclusive, each 0..=24 (`"9-17"`, `"0-24"` = always; a start after the
//! end wraps past midnight, `"22-6"`). The host passes it through with
//! `env = ["ABAC_BUSINESS_HOURS"]`; when it is missing or malformed every request is denied with
//! a reason naming it, never a silent default. The current hour is read from the clock
//! (`clock` grant), not from the input.

use std::env::VarError;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use sandgate_guest::{Decision, Input, Request};
use serde::Deserialize;

/// The variable holding the business hours.
const HOURS_VAR: &str = "ABAC_BUSINESS_HOURS";

sandgate_guest::policy!(evaluate);

fn evaluate(input: Input<Query>) -> Decision {
    let hours = match hours_from(std::env::var(HOURS_VAR)) {
        Ok(hours) => hours,
        Err(reason) => return Decision::deny().status(500).reason(reason),
    };
    let Some(hour) = current_utc_hour() else {
        return Decision::deny()
            .status(500)
            .reason("the clock reads a time before 1970");
    };
    decide(&input.input, hours, hour)
}

/// Either input shape, told apart by which fields are present.
#[derive(Debug, Deserialize)]
struct Query {
    subject: Option<Subject>,
    resource: Option<Resource>,
    request: Option<Request>,
}

#[derive(Debug, Deserialize)]
struct Subject {
    id: String,
}

#[derive(Debug, Deserialize)]
struct Resource {
    owner: Option<String>,
}

/// Allows the owner of the resource, within `hours`.
fn decide(query: &Query, hours: BusinessHours, hour: u8) -> Decision {
    let (subject, owner) = match parties(query) {
        Ok(parties) => parties,
        Err(reason) => return Decision::deny().status(403).reason(reason),
    };
    if subject != owner {
        return Decision::deny().status(403).reason(format!(
            "{subject} is not the owner of the resource (owner: {owner})"
        ));
    }
    if !hours.contains(hour) {
        return Decision::deny().status(403).reason(format!(
            "outside business hours {hours} UTC (current hour {hour})"
        ));
    }
    Decision::allow().header("x-user", subject)
}

/// The subject and the resource owner, both non-empty.
fn parties(query: &Query) -> Result<(&str, &str), String> {
    let (subject, owner) = match (&query.request, &query.subject, &query.resource) {
        (Some(request), _, _) => (request.header("x-user"), request.header("x-resource-owner")),
        (None, Some(subject), Some(resource)) => {
            (Some(subject.id.as_str()), resource.owner.as_deref())
        }
        _ => {
            return Err(
                "input needs subject.id and resource.owner, or a forward-auth request".to_owned(),
            );
        }
    };
    let subject = subject
        .filter(|subject| !subject.is_empty())
        .ok_or("no subject: subject.id or header x-user is missing or empty")?;
    let owner = owner
        .filter(|owner| !owner.is_empty())
        .ok_or("no owner: resource.owner or header x-resource-owner is missing or empty")?;
    Ok((subject, owner))
}

/// The hour of day in UTC, `None` when the clock reads before 1970.
fn current_utc_hour() -> Option<u8> {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    u8::try_from(since_epoch.as_secs() / 3600 % 24).ok()
}

/// A window of whole hours, `start` inclusive, `end` exclusive, wrapping past midnight when
/// `start > end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BusinessHours {
    start: u8,
    end: u8,
}

impl BusinessHours {
    fn parse(value: &str) -> Result<Self, String> {
        let (start, end) = value
            .trim()
            .split_once('-')
            .ok_or("no '-' between the start and end hour")?;
        let (start, end) = (hour(start)?, hour(end)?);
        if start == 24 {
            return Err("the start hour must be 0..=23".to_owned());
        }
        if start == end {
            return Err("the window is empty".to_owned());
        }
        Ok(Self { start, end })
    }

    fn contains(self, hour: u8) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&hour)
        } else {
            hour >= self.start || hour < self.end
        }
    }
}

impl fmt::Display for BusinessHours {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// One hour of `HH-HH`: one or two ASCII digits, at most 24.
fn hour(text: &str) -> Result<u8, String> {
    let text = text.trim();
    let digits_only =
        !text.is_empty() && text.len() <= 2 && text.bytes().all(|b| b.is_ascii_digit());
    match text.parse::<u8>() {
        Ok(hour) if digits_only && hour <= 24 => Ok(hour),
        _ => Err(format!("{text:?} is not an hour 0..=24")),
    }
}

/// The business hours from the variable's value, or the deny reason naming the variable.
fn hours_from(value: Result<String, VarError>) -> Result<BusinessHours, String> {
    let value = match value {
        Ok(value) => value,
        Err(VarError::NotPresent) => {
            return Err(format!(
                "{HOURS_VAR} is not set: give the policy env = [\"{HOURS_VAR}\"] and set it, e.g. \"9-17\""
            ));
        }
        Err(VarError::NotUnicode(_)) => return Err(format!("{HOURS_VAR} is not UTF-8")),
    };
    BusinessHours::parse(&value).map_err(|problem| {
        format!("{HOURS_VAR}={value:?} is malformed: {problem} (expected \"HH-HH\", e.g. \"9-17\")")
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use serde_json::{Value, json};

    use super::*;

    const NINE_TO_FIVE: BusinessHours = BusinessHours { start: 9, end: 17 };

    fn decide_json(input: &str, hours: BusinessHours, hour: u8) -> Value {
        let query: Query = serde_json::from_str(input).expect("valid query");
        serde_json::to_value(decide(&query, hours, hour)).expect("serialises")
    }

    const OWNER_ALICE: &str =
        r#"{"subject":{"id":"alice"},"resource":{"type":"orders","id":"7","owner":"alice"}}"#;

    #[test]
    fn owner_is_allowed_within_hours() {
        assert_eq!(
            decide_json(OWNER_ALICE, NINE_TO_FIVE, 9),
            json!({"allow": true, "headers": {"x-user": "alice"}})
        );
        assert_eq!(decide_json(OWNER_ALICE, NINE_TO_FIVE, 16)["allow"], true);
    }

    #[test]
    fn owner_is_denied_outside_hours_with_window_and_hour() {
        assert_eq!(
            decide_json(OWNER_ALICE, NINE_TO_FIVE, 17),
            json!({
                "allow": false,
                "status": 403,
                "reason": "outside business hours 9-17 UTC (current hour 17)"
            })
        );
    }

    #[test]
    fn someone_else_is_denied() {
        let input = r#"{"subject":{"id":"bob"},"resource":{"owner":"alice"}}"#;
        let decision = decide_json(input, NINE_TO_FIVE, 10);
        assert_eq!(decision["allow"], false);
        assert_eq!(decision["status"], 403);
        assert_eq!(
            decision["reason"],
            "bob is not the owner of the resource (owner: alice)"
        );
    }

    #[test]
    fn missing_or_empty_parties_are_denied() {
        for input in [
            r#"{"subject":{"id":"alice"}}"#,
            r#"{"subject":{"id":""},"resource":{"owner":""}}"#,
            r#"{"subject":{"id":"alice"},"resource":{}}"#,
            r#"{"request":{"headers":{"x-user":"alice"}}}"#,
        ] {
            assert_eq!(
                decide_json(input, NINE_TO_FIVE, 10)["allow"],
                false,
                "{input}"
            );
        }
    }

    #[test]
    fn forward_auth_reads_user_and_owner_headers() {
        let input = r#"{"request":{"method":"GET","path":"/api/orders/7",
            "headers":{"x-user":"alice","x-resource-owner":"alice"}}}"#;
        assert_eq!(decide_json(input, NINE_TO_FIVE, 12)["allow"], true);
        let input = input.replace(
            r#""x-resource-owner":"alice""#,
            r#""x-resource-owner":"carol""#,
        );
        assert_eq!(decide_json(&input, NINE_TO_FIVE, 12)["allow"], false);
    }

    #[test]
    fn hours_parse_and_contain() {
        let always = BusinessHours::parse("0-24").expect("valid");
        assert!((0..24).all(|hour| always.contains(hour)));
        let day = BusinessHours::parse(" 09-17 ").expect("valid");
        assert_eq!(day, NINE_TO_FIVE);
        assert!(!day.contains(8) && day.contains(9) && day.contains(16) && !day.contains(17));
        let night = BusinessHours::parse("22-6").expect("valid");
        assert!(night.contains(23) && night.contains(0) && night.contains(5));
        assert!(!night.contains(6) && !night.contains(21));
    }

    #[test]
    fn malformed_hours_are_refused() {
        for value in [
            "", "9", "9-", "-17", "a-b", "9-25", "24-1", "9-9", "+9-17", "009-17", "9:00-17",
        ] {
            assert!(BusinessHours::parse(value).is_err(), "{value:?}");
        }
    }

    #[test]
    fn missing_or_malformed_variable_is_named_in_the_reason() {
        let missing = hours_from(Err(VarError::NotPresent)).expect_err("missing");
        assert!(
            missing.starts_with("ABAC_BUSINESS_HOURS is not set"),
            "{missing}"
        );
        let malformed = hours_from(Ok("nine-five".into())).expect_err("malformed");
        assert!(
            malformed.starts_with("ABAC_BUSINESS_HOURS=\"nine-five\" is malformed"),
            "{malformed}"
        );
        let not_utf8 = hours_from(Err(VarError::NotUnicode(OsString::new()))).expect_err("bytes");
        assert!(not_utf8.contains("ABAC_BUSINESS_HOURS"), "{not_utf8}");
        assert_eq!(hours_from(Ok("9-17".into())), Ok(NINE_TO_FIVE));
    }

    #[test]
    fn current_hour_is_an_hour() {
        assert!(current_utc_hour().expect("clock after 1970") < 24);
    }

    #[test]
    fn shipped_sample_is_an_owner_request() {
        let decision = decide_json(
            include_str!("../input.json"),
            BusinessHours { start: 0, end: 24 },
            3,
        );
        assert_eq!(decision["allow"], true);
    }
}
