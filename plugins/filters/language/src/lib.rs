//! `language`: keeps records written in chosen languages, identified in the sandbox by `whatlang` (trigram
//! profiles of 69 languages, pure Rust).
//!
//! ```toml
//! [[filter]]
//! plugin = "language"
//! keep = ["eng", "deu"]   # ISO 639-3 codes; "*" keeps any identified language (with `annotate`: label only)
//! min_confidence = 0.5    # whatlang's confidence, 0 to 1: under it a text counts as unidentified
//! per = "record"          # the selected turns' text as one; "turn": every selected turn must pass on its own
//! roles = ["assistant"]   # the turns judged (default: all)
//! min_chars = 20          # texts shorter than this (in characters) are not judged, and kept
//! annotate = false        # kept records get meta `language` (the code) and `language_confidence` (per = "record")
//! ```
//!
//! Drop reasons: "language fra not kept", "language unidentified" (no guess, or one under `min_confidence`).
//! Short texts ("Yes.", "42") cannot be identified, hence `min_chars`: a record whose judged text is shorter
//! is kept as it is; with `per = "turn"` only the long enough turns are judged.
use lorahost_sdk::{Example, Filter, Verdict};
use lorahost_text::Roles;
use whatlang::Lang;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    keep: Vec<String>,
    #[serde(default = "half")]
    min_confidence: f64,
    #[serde(default)]
    per: Per,
    roles: Option<Vec<String>>,
    #[serde(default = "twenty")]
    min_chars: usize,
    #[serde(default)]
    annotate: bool,
}

fn half() -> f64 {
    0.5
}
fn twenty() -> usize {
    20
}

#[derive(serde::Deserialize, Default, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Per {
    #[default]
    Record,
    Turn,
}

struct Language {
    /// `None`: any identified language.
    keep: Option<Vec<Lang>>,
    min_confidence: f64,
    per: Per,
    roles: Roles,
    min_chars: usize,
    annotate: bool,
}

/// What a judged text is: a language with its confidence, or a drop reason.
enum Judgement {
    Short,
    Kept(Lang, f64),
    Dropped(String),
}

impl Language {
    fn judge(&self, text: &str) -> Judgement {
        if text.chars().count() < self.min_chars {
            return Judgement::Short;
        }
        let Some(info) = whatlang::detect(text).filter(|i| i.confidence() >= self.min_confidence) else {
            return Judgement::Dropped("language unidentified".into());
        };
        let lang = info.lang();
        if self.keep.as_ref().is_some_and(|k| !k.contains(&lang)) {
            return Judgement::Dropped(format!("language {} not kept", lang.code()));
        }
        Judgement::Kept(lang, info.confidence())
    }
}

impl Filter for Language {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        if c.keep.is_empty() {
            return Err("keep = [] keeps no language; name ISO 639-3 codes such as \"eng\", or \"*\"".into());
        }
        let keep = if c.keep.iter().any(|k| k == "*") {
            None
        } else {
            let langs = c.keep.iter().map(|code| {
                Lang::from_code(code.as_str()).ok_or_else(|| {
                    let known: Vec<&str> = Lang::all().iter().map(|l| l.code()).collect();
                    format!("keep: {code:?} is not a language code whatlang knows; use ISO 639-3 codes: {}", known.join(", "))
                })
            });
            Some(langs.collect::<Result<Vec<_>, _>>()?)
        };
        if !(0.0..=1.0).contains(&c.min_confidence) {
            return Err(format!("min_confidence = {} is out of range: use a value from 0 to 1", c.min_confidence));
        }
        if c.annotate && c.per == Per::Turn {
            return Err("annotate labels whole records: use it with per = \"record\"".into());
        }
        Ok(Language {
            keep,
            min_confidence: c.min_confidence,
            per: c.per,
            roles: Roles::new(c.roles)?,
            min_chars: c.min_chars,
            annotate: c.annotate,
        })
    }

    fn filter(&mut self, example: &Example) -> Verdict {
        match self.per {
            Per::Turn => {
                for turn in self.roles.turns(example) {
                    if let Judgement::Dropped(reason) = self.judge(&turn.content) {
                        return Verdict::Drop(reason);
                    }
                }
                Verdict::Keep
            }
            Per::Record => {
                let text: Vec<&str> = self.roles.turns(example).map(|t| t.content.as_str()).collect();
                match self.judge(&text.join("\n")) {
                    Judgement::Dropped(reason) => Verdict::Drop(reason),
                    Judgement::Kept(lang, confidence) if self.annotate => {
                        let mut labelled = example.clone();
                        labelled.set_meta("language", lang.code());
                        labelled.set_meta("language_confidence", format!("{confidence:.3}"));
                        Verdict::Rewrite(labelled)
                    }
                    _ => Verdict::Keep,
                }
            }
        }
    }
}

lorahost_sdk::export_filter!(Language);

#[cfg(test)]
mod tests {
    use super::*;
    use lorahost_sdk::{parse_config, Turn};

    const EN: &str = "The weather was pleasant yesterday, so we walked along the river and talked about our plans.";
    const DE: &str = "Das Wetter war gestern angenehm, also sind wir am Fluss entlang gelaufen und haben geredet.";
    const FR: &str = "Il faisait beau hier, alors nous avons marché le long de la rivière en parlant de nos projets.";

    fn language(config: &str) -> Language {
        Language::new(parse_config(config).unwrap()).unwrap()
    }

    fn qa(q: &str, a: &str) -> Example {
        Example::new("1", "d", vec![Turn::new("user", q), Turn::new("assistant", a)])
    }

    #[test]
    fn keeps_listed_languages_per_record() {
        let mut f = language("keep = [\"eng\", \"deu\"]");
        assert_eq!(f.filter(&qa(EN, EN)), Verdict::Keep);
        assert_eq!(f.filter(&qa(DE, DE)), Verdict::Keep);
        assert_eq!(f.filter(&qa(FR, FR)), Verdict::Drop("language fra not kept".into()));
        // Too short to judge: kept.
        assert_eq!(f.filter(&qa("Oui.", "Merci.")), Verdict::Keep);
        // Digits and symbols only: nothing to identify.
        assert_eq!(f.filter(&qa("1234 5678 9012 3456 7890", "+-*/ = %%% ###")), Verdict::Drop("language unidentified".into()));
    }

    #[test]
    fn per_turn_and_roles() {
        let mixed = qa(FR, EN);
        assert_eq!(language("keep = [\"eng\"]\nper = \"turn\"").filter(&mixed), Verdict::Drop("language fra not kept".into()));
        assert_eq!(language("keep = [\"eng\"]\nroles = [\"assistant\"]").filter(&mixed), Verdict::Keep);
        // Per turn, a short turn is not judged.
        assert_eq!(language("keep = [\"eng\"]\nper = \"turn\"").filter(&qa("Bonjour", EN)), Verdict::Keep);
    }

    #[test]
    fn confidence_threshold_edges() {
        let conf = whatlang::detect(EN).unwrap().confidence();
        assert_eq!(language(&format!("keep = [\"eng\"]\nmin_confidence = {conf}")).filter(&qa(EN, "")), Verdict::Keep);
        if conf < 1.0 {
            let above = (conf + 1e-9).min(1.0);
            let mut f = language(&format!("keep = [\"eng\"]\nmin_confidence = {above}"));
            assert_eq!(f.filter(&qa(EN, "")), Verdict::Drop("language unidentified".into()));
        }
    }

    #[test]
    fn annotate_adds_the_label_and_keeps_the_rest() {
        let mut f = language("keep = [\"*\"]\nannotate = true\nmin_confidence = 0.0");
        let mut e = qa(DE, DE);
        e.set_meta("source", "x");
        let Verdict::Rewrite(labelled) = f.filter(&e) else { panic!("expected a rewrite") };
        assert_eq!(labelled.meta("language"), Some("deu"));
        assert!(labelled.meta("language_confidence").unwrap().parse::<f64>().unwrap() > 0.0);
        assert_eq!((&labelled.turns, labelled.meta("source"), labelled.id.as_str()), (&e.turns, Some("x"), "1"));
    }

    #[test]
    fn rejects_bad_options() {
        let err = |c: &str| Language::new(parse_config(c).unwrap()).err().unwrap();
        assert!(err("keep = [\"english\"]").contains("\"english\" is not a language code"));
        assert!(err("keep = []").contains("keeps no language"));
        assert!(err("keep = [\"eng\"]\nmin_confidence = 2.0").contains("out of range"));
        assert!(err("keep = [\"eng\"]\nannotate = true\nper = \"turn\"").contains("per = \"record\""));
        assert!(parse_config::<Config>("keep = [\"eng\"]\nper = \"line\"").is_err());
    }
}
