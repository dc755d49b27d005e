//! `pii`: redacts personal data by rewriting records, never dropping one: e-mail addresses, IPv4 and IPv6
//! addresses, phone numbers, and any patterns of your own, each replaced by a token.
//!
//! ```toml
//! [[filter]]
//! plugin = "pii"
//! email = "<EMAIL>"     # the replacement token; "" leaves that kind alone
//! ip = "<IP>"           # IPv4 and IPv6 (checked by parsing: 999.1.1.1 and 12:30:45 are not addresses)
//! phone = "<PHONE>"     # 10 to 15 digits in groups (+44 20 7946 0958, (555) 123-4567, 555.123.4567), or 8+ after a '+'
//! patterns = [{ pattern = "\\bEMP-\\d{6}\\b", token = "<EMPLOYEE>" }]   # your own regexes (Rust `regex` syntax)
//! roles = ["user", "assistant"]   # the turns redacted (default: all)
//! ```
//!
//! A changed record keeps its id, dataset, roles and every other character; it gains meta `pii` with what was
//! replaced ("2 email, 1 phone"), and `lorahost check` counts it as rewritten. Kinds run in the order above,
//! so an e-mail address is never half-read as something else.
use lorahost_sdk::{Example, Filter, Verdict};
use lorahost_text::Roles;
use regex::Regex;
use std::net::{Ipv4Addr, Ipv6Addr};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "email_token")]
    email: String,
    #[serde(default = "ip_token")]
    ip: String,
    #[serde(default = "phone_token")]
    phone: String,
    #[serde(default)]
    patterns: Vec<UserPattern>,
    roles: Option<Vec<String>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UserPattern {
    pattern: String,
    token: String,
}

fn email_token() -> String {
    "<EMAIL>".into()
}
fn ip_token() -> String {
    "<IP>".into()
}
fn phone_token() -> String {
    "<PHONE>".into()
}

/// One kind of personal data: where it may be, and whether a match really is one.
struct Kind {
    name: String,
    regex: Regex,
    token: String,
    valid: Check,
}

/// Whether a match of a kind's regex really is one.
type Check = fn(&str) -> bool;

fn any(_: &str) -> bool {
    true
}

fn ip_address(s: &str) -> bool {
    s.parse::<Ipv4Addr>().is_ok() || s.parse::<Ipv6Addr>().is_ok()
}

fn phone_number(s: &str) -> bool {
    let digits = s.chars().filter(char::is_ascii_digit).count();
    if s.starts_with('+') {
        (8..=15).contains(&digits)
    } else {
        (10..=15).contains(&digits)
    }
}

struct Pii {
    kinds: Vec<Kind>,
    roles: Roles,
}

/// Whether the match `[start, end)` of `text` stands alone (no letter, digit, '_' or '@' right before or
/// after), so parts of longer numbers and words are not taken.
fn stands_alone(text: &str, start: usize, end: usize) -> bool {
    let joined = |c: char| c.is_alphanumeric() || c == '_' || c == '@';
    let before = text[..start].chars().next_back().is_some_and(joined);
    let after = text[end..].chars().next().is_some_and(joined);
    !before && !after
}

impl Pii {
    /// `text` with every kind redacted, and the count of replacements per kind.
    fn redact(&self, text: &str, counts: &mut [usize]) -> Option<String> {
        let mut current: Option<String> = None;
        for (k, kind) in self.kinds.iter().enumerate() {
            let src = current.as_deref().unwrap_or(text);
            let mut out = String::new();
            let mut last = 0;
            for m in kind.regex.find_iter(src) {
                if !(kind.valid)(m.as_str()) || !stands_alone(src, m.start(), m.end()) {
                    continue;
                }
                out.push_str(&src[last..m.start()]);
                out.push_str(&kind.token);
                last = m.end();
                counts[k] += 1;
            }
            if last > 0 {
                out.push_str(&src[last..]);
                current = Some(out);
            }
        }
        current
    }
}

impl Filter for Pii {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        let built_in: [(&str, String, &str, Check); 4] = [
            ("email", c.email, r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", any),
            // Candidates only; parsing decides.
            ("ip", c.ip.clone(), r"(?i)[0-9a-f:]*:[0-9a-f:]*:[0-9a-f:.]*", ip_address),
            ("ip", c.ip, r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", ip_address),
            ("phone", c.phone, r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,5}(?:[ .-]\d{2,5}){1,4}|\+\d{8,15}", phone_number),
        ];
        let mut kinds = Vec::new();
        for (name, token, pattern, valid) in built_in {
            if !token.is_empty() {
                kinds.push(Kind { name: name.into(), regex: Regex::new(pattern).expect("built-in pattern"), token, valid });
            }
        }
        for (i, p) in c.patterns.into_iter().enumerate() {
            let regex = Regex::new(&p.pattern).map_err(|e| format!("patterns[{i}]: {:?} is not a regex: {e}", p.pattern))?;
            if regex.is_match("") {
                return Err(format!("patterns[{i}]: {:?} matches the empty text; it would insert tokens everywhere", p.pattern));
            }
            kinds.push(Kind { name: p.token.trim_matches(|c| c == '<' || c == '>').to_lowercase(), regex, token: p.token, valid: any });
        }
        if kinds.is_empty() {
            return Err("every kind is off (empty tokens) and there are no patterns: nothing to redact".into());
        }
        Ok(Pii { kinds, roles: Roles::new(c.roles)? })
    }

    fn filter(&mut self, example: &Example) -> Verdict {
        let mut counts = vec![0usize; self.kinds.len()];
        let mut changed: Option<Example> = None;
        for (t, turn) in example.turns.iter().enumerate() {
            if !self.roles.reads(&turn.role) {
                continue;
            }
            if let Some(text) = self.redact(&turn.content, &mut counts) {
                changed.get_or_insert_with(|| example.clone()).turns[t].content = text;
            }
        }
        let Some(mut changed) = changed else {
            return Verdict::Keep;
        };
        // Both IP kinds count as one "ip".
        let mut totals: Vec<(&str, usize)> = Vec::new();
        for (kind, n) in self.kinds.iter().zip(counts).filter(|(_, n)| *n > 0) {
            match totals.iter_mut().find(|(name, _)| *name == kind.name) {
                Some(t) => t.1 += n,
                None => totals.push((&kind.name, n)),
            }
        }
        let summary: Vec<String> = totals.iter().map(|(name, n)| format!("{n} {name}")).collect();
        changed.set_meta("pii", summary.join(", "));
        Verdict::Rewrite(changed)
    }
}

lorahost_sdk::export_filter!(Pii);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::{parse_config, Turn};

    fn pii(config: &str) -> Pii {
        Pii::new(parse_config(config).unwrap()).unwrap()
    }

    /// The redacted assistant turn (or the text unchanged) and the `pii` meta.
    fn redact(f: &mut Pii, text: &str) -> (String, Option<String>) {
        let e = Example::new("r:1", "d", vec![Turn::new("assistant", text)]);
        match f.filter(&e) {
            Verdict::Keep => (text.to_string(), None),
            Verdict::Rewrite(new) => (new.turns[0].content.clone(), new.meta("pii").map(str::to_string)),
            Verdict::Drop(r) => panic!("pii never drops, dropped: {r}"),
        }
    }

    #[test]
    fn emails_ips_and_phones() {
        let mut f = pii("");
        let (text, meta) = redact(&mut f, "Write to ann.lee+news@mail.example.co.uk or call +44 20 7946 0958.");
        assert_eq!(text, "Write to <EMAIL> or call <PHONE>.");
        assert_eq!(meta.as_deref(), Some("1 email, 1 phone"));
        let (text, meta) = redact(&mut f, "Hosts 192.168.0.1, 2001:db8::8a2e:370:7334 and ::1 are up; 999.1.1.1 is not.");
        assert_eq!(text, "Hosts <IP>, <IP> and <IP> are up; 999.1.1.1 is not.");
        assert_eq!(meta.as_deref(), Some("3 ip"));
        let (text, _) = redact(&mut f, "US: (555) 123-4567, 555.123.4567 or 555-123-4567.");
        assert_eq!(text, "US: <PHONE>, <PHONE> or <PHONE>.");
    }

    #[test]
    fn leaves_look_alikes_alone() {
        let mut f = pii("");
        for text in [
            "The meeting is at 12:30:45 on 2021-10-12.",
            "Version 1.2.3 shipped; order 1234 5678 arrived.",
            "Pi is 3.14159265358979 and a@b is not an address.",
            "Call extension 4567.",
        ] {
            assert_eq!(redact(&mut f, text), (text.to_string(), None), "{text}");
        }
    }

    #[test]
    fn rewrite_keeps_everything_else() {
        let mut f = pii("roles = [\"user\"]");
        let mut e = Example::new(
            "r:9",
            "d",
            vec![Turn::new("system", "Mail admin@example.org"), Turn::new("user", "I am bob@example.com"), Turn::new("assistant", "ok")],
        );
        e.set_meta("source", "forum");
        let Verdict::Rewrite(new) = f.filter(&e) else { panic!("expected a rewrite") };
        assert_eq!(new.turns[0], e.turns[0], "system turn not selected");
        assert_eq!(new.turns[1], Turn::new("user", "I am <EMAIL>"));
        assert_eq!(new.turns[2], e.turns[2]);
        assert_eq!((new.id.as_str(), new.dataset.as_str(), new.meta("source")), ("r:9", "d", Some("forum")));
        assert_eq!(new.meta("pii"), Some("1 email"));
        assert_eq!(f.filter(&Example::new("x", "d", vec![Turn::new("user", "nothing here")])), Verdict::Keep);
    }

    #[test]
    fn own_patterns_and_kinds_turned_off() {
        let mut f = pii("email = \"\"\npatterns = [{ pattern = '\\bEMP-\\d{6}\\b', token = \"<EMPLOYEE>\" }]");
        let (text, meta) = redact(&mut f, "EMP-123456 wrote from x@y.org");
        assert_eq!(text, "<EMPLOYEE> wrote from x@y.org");
        assert_eq!(meta.as_deref(), Some("1 employee"));
    }

    #[test]
    fn rejects_bad_options() {
        let err = |c: &str| Pii::new(parse_config(c).unwrap()).err().unwrap();
        assert!(err("patterns = [{ pattern = \"(unclosed\", token = \"<X>\" }]").contains("patterns[0]: \"(unclosed\" is not a regex"));
        assert!(err("patterns = [{ pattern = \"a*\", token = \"<X>\" }]").contains("matches the empty text"));
        assert!(err("email = \"\"\nip = \"\"\nphone = \"\"").contains("nothing to redact"));
        assert!(parse_config::<Config>("mail = \"x\"").err().unwrap().contains("unknown field `mail`"));
    }
}
