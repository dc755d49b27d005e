//! `regex`: keeps or drops records by regular expressions (Rust `regex` syntax) on chosen fields.
//!
//! ```toml
//! [[filter]]
//! plugin = "regex"
//! drop = ['(?i)\bas an ai language model\b', 'https?://']   # drop a record when any field matches one
//! keep = ['\?\s*$']                  # if given: keep only records where some field matches one of these
//! fields = ["content", "id", "meta.source"]   # what is matched: turn contents, the record id, metadata values
//! roles = ["assistant"]              # whose turn contents count for "content" (default: all)
//! ```
//!
//! `fields` defaults to `["content"]`. A pattern is matched against each field on its own (a turn's content,
//! not the turns joined). Drop reasons: "matches drop pattern `https?://`" (the first pattern in the list that
//! matched) and "matches no keep pattern". `drop` is checked first.
use lorahost_sdk::{Example, Filter, Verdict};
use lorahost_text::Roles;
use regex::RegexSet;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    drop: Vec<String>,
    #[serde(default)]
    keep: Vec<String>,
    #[serde(default = "content")]
    fields: Vec<String>,
    roles: Option<Vec<String>>,
}

fn content() -> Vec<String> {
    vec!["content".into()]
}

/// Where a pattern looks.
enum Field {
    Content,
    Id,
    Meta(String),
}

struct RegexFilter {
    drop: RegexSet,
    keep: Option<RegexSet>,
    fields: Vec<Field>,
    roles: Roles,
}

fn set(key: &str, patterns: &[String]) -> Result<RegexSet, String> {
    for (i, p) in patterns.iter().enumerate() {
        regex::Regex::new(p).map_err(|e| format!("{key}[{i}]: {p:?} is not a regex: {e}"))?;
    }
    RegexSet::new(patterns).map_err(|e| format!("{key}: {e}"))
}

impl RegexFilter {
    /// The texts the patterns are matched against.
    fn texts<'a>(&'a self, e: &'a Example) -> impl Iterator<Item = &'a str> + 'a {
        self.fields.iter().flat_map(move |f| -> Box<dyn Iterator<Item = &'a str> + 'a> {
            match f {
                Field::Content => Box::new(self.roles.turns(e).map(|t| t.content.as_str())),
                Field::Id => Box::new(std::iter::once(e.id.as_str())),
                Field::Meta(key) => Box::new(e.meta(key).into_iter()),
            }
        })
    }
}

impl Filter for RegexFilter {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        if c.drop.is_empty() && c.keep.is_empty() {
            return Err("give `drop` or `keep` patterns (or both)".into());
        }
        if c.fields.is_empty() {
            return Err("fields = [] matches nothing; use \"content\", \"id\" or \"meta.<key>\"".into());
        }
        let fields = c
            .fields
            .iter()
            .map(|f| match f.as_str() {
                "content" => Ok(Field::Content),
                "id" => Ok(Field::Id),
                other => match other.strip_prefix("meta.") {
                    Some(key) if !key.is_empty() => Ok(Field::Meta(key.to_string())),
                    _ => Err(format!("fields: {other:?} is not a field; use \"content\", \"id\" or \"meta.<key>\"")),
                },
            })
            .collect::<Result<_, _>>()?;
        Ok(RegexFilter {
            drop: set("drop", &c.drop)?,
            keep: if c.keep.is_empty() { None } else { Some(set("keep", &c.keep)?) },
            fields,
            roles: Roles::new(c.roles)?,
        })
    }

    fn filter(&mut self, example: &Example) -> Verdict {
        let first_drop = self.texts(example).filter_map(|t| self.drop.matches(t).iter().next()).min();
        if let Some(i) = first_drop {
            return Verdict::Drop(format!("matches drop pattern `{}`", self.drop.patterns()[i]));
        }
        match &self.keep {
            Some(keep) if !self.texts(example).any(|t| keep.is_match(t)) => Verdict::Drop("matches no keep pattern".into()),
            _ => Verdict::Keep,
        }
    }
}

lorahost_sdk::export_filter!(RegexFilter);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::{parse_config, Turn};

    fn regex(config: &str) -> RegexFilter {
        RegexFilter::new(parse_config(config).unwrap()).unwrap()
    }

    fn qa(q: &str, a: &str) -> Example {
        let mut e = Example::new("web:3", "d", vec![Turn::new("user", q), Turn::new("assistant", a)]);
        e.set_meta("source", "forum");
        e
    }

    #[test]
    fn drop_patterns_name_the_first_that_matched() {
        let mut f = regex("drop = ['(?i)as an ai language model', 'https?://']");
        assert_eq!(f.filter(&qa("hi", "As an AI language model, I cannot.")), Verdict::Drop("matches drop pattern `(?i)as an ai language model`".into()));
        assert_eq!(f.filter(&qa("see http://x.org", "As an AI Language Model")), Verdict::Drop("matches drop pattern `(?i)as an ai language model`".into()));
        assert_eq!(f.filter(&qa("see https://x.org", "sure")), Verdict::Drop("matches drop pattern `https?://`".into()));
        assert_eq!(f.filter(&qa("hello", "world")), Verdict::Keep);
    }

    #[test]
    fn keep_patterns_and_roles() {
        let mut f = regex("keep = ['\\?\\s*$']\nroles = [\"user\"]");
        assert_eq!(f.filter(&qa("Why? ", "Because.")), Verdict::Keep);
        assert_eq!(f.filter(&qa("Tell me.", "Why?")), Verdict::Drop("matches no keep pattern".into()));
        // drop wins over keep.
        let mut both = regex("keep = ['.']\ndrop = ['secret']");
        assert_eq!(both.filter(&qa("a secret", "b")), Verdict::Drop("matches drop pattern `secret`".into()));
    }

    #[test]
    fn fields_id_and_meta() {
        let mut f = regex("drop = ['^web:', 'forum']\nfields = [\"id\"]");
        assert_eq!(f.filter(&qa("forum", "forum")), Verdict::Drop("matches drop pattern `^web:`".into()));
        let mut f = regex("drop = ['forum']\nfields = [\"meta.source\"]");
        assert_eq!(f.filter(&qa("a", "b")), Verdict::Drop("matches drop pattern `forum`".into()));
        let mut f = regex("drop = ['forum']\nfields = [\"meta.missing\"]");
        assert_eq!(f.filter(&qa("forum", "forum")), Verdict::Keep);
    }

    #[test]
    fn rejects_bad_options() {
        let err = |c: &str| RegexFilter::new(parse_config(c).unwrap()).err().unwrap();
        assert!(err("drop = ['(']").contains("drop[0]: \"(\" is not a regex"));
        assert!(err("keep = ['ok', '[z-a]']").contains("keep[1]"));
        assert!(err("").contains("give `drop` or `keep`"));
        assert!(err("drop = ['x']\nfields = [\"title\"]").contains("\"title\" is not a field"));
        assert!(err("drop = ['x']\nfields = [\"meta.\"]").contains("is not a field"));
        assert!(err("drop = ['x']\nroles = [\"bot\"]").contains("not a role"));
    }
}
