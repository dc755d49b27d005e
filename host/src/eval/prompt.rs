//! From an evaluation record to the text the model sees, as lm-evaluation-harness builds it:
//! `description + shot_1 + delim + ... + shot_k + delim + prompt(record)`, each shot being
//! `prompt(example) + target_delimiter + target(example)`.
//!
//! Templates are text with `{field}` placeholders, `field` a metadata key of the record (or `id`), optionally
//! piped through filters: `{question|strip}`, `{subject|words}`, `{choices|lettered}`. `{{` and `}}` are
//! literal braces.
use super::task::{Choices, Fewshot, Sampler, Task};
use crate::plugins::Example;
use crate::rng::Rng;
use anyhow::{bail, Context};

/// One record made ready for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompted {
    /// Everything before the answer.
    pub context: String,
    /// Multiple choice: each choice's continuation (delimiter included, e.g. " A").
    pub continuations: Vec<String>,
    /// Multiple choice: the text each choice is length-normalised by (the choice without the delimiter).
    pub choice_texts: Vec<String>,
    /// Multiple choice: the right choice, and which choices are right (MC2).
    pub gold: usize,
    pub labels: Vec<bool>,
    /// Generate: the scorer's references.
    pub references: Vec<String>,
}

/// A record's field as text: `id`, or a metadata value.
fn field<'a>(e: &'a Example, name: &str) -> Option<&'a str> {
    if name == "id" {
        return Some(&e.id);
    }
    e.meta.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// A JSON list of strings held in a metadata field (`choices`).
fn json_list(e: &Example, name: &str) -> anyhow::Result<Vec<String>> {
    let text = field(e, name).with_context(|| format!("record {} has no `{name}` field", e.id))?;
    serde_json::from_str(text).with_context(|| format!("record {}: `{name}` is not a JSON list of texts", e.id))
}

fn apply_filter(value: String, filter: &str) -> anyhow::Result<String> {
    Ok(match filter {
        "strip" => value.trim().to_string(),
        "words" => value.replace('_', " "),
        "lettered" => {
            let items: Vec<String> =
                serde_json::from_str(&value).context("`lettered` needs a JSON list of texts (like `choices`)")?;
            items.iter().enumerate().map(|(i, c)| format!("{}. {c}", letter(i))).collect::<Vec<_>>().join("\n")
        }
        other => bail!("unknown filter `{other}`: use strip, words or lettered"),
    })
}

/// `A`, `B`, ... for choice `i` (0-based), as the harness letters MMLU's four choices.
pub fn letter(i: usize) -> String {
    char::from(b'A' + (i % 26) as u8).to_string().repeat(i / 26 + 1)
}

/// Fills a template's placeholders from the record.
pub fn render(template: &str, e: &Example) -> anyhow::Result<String> {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let (c, after) = (rest.as_bytes()[i], &rest[i + 1..]);
        if after.as_bytes().first() == Some(&c) {
            out.push(char::from(c));
            rest = &after[1..];
            continue;
        }
        if c == b'}' {
            bail!("a lone `}}` in the template (write `}}}}` for a literal brace)");
        }
        let end = after.find('}').context("a `{` without its `}` in the template (write `{{` for a literal brace)")?;
        let mut parts = after[..end].split('|').map(str::trim);
        let name = parts.next().unwrap_or_default();
        let Some(value) = field(e, name) else {
            let mut keys: Vec<&str> = e.meta.iter().map(|(k, _)| k.as_str()).collect();
            keys.push("id");
            bail!("record {} has no field `{name}` (it has: {})", e.id, keys.join(", "));
        };
        let mut value = value.to_string();
        for f in parts {
            value = apply_filter(value, f).with_context(|| format!("record {}: `{{{}}}`", e.id, &after[..end]))?;
        }
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A multiple-choice record's choice texts (no delimiter) and its gold index and labels.
fn choices_of(task: &Task, e: &Example) -> anyhow::Result<(Vec<String>, usize, Vec<bool>)> {
    let texts = json_list(e, "choices")?;
    if texts.is_empty() {
        bail!("record {} has no choices", e.id);
    }
    let gold: usize = field(e, "gold")
        .with_context(|| format!("record {} has no `gold` field", e.id))?
        .parse()
        .with_context(|| format!("record {}: `gold` is not an index", e.id))?;
    if gold >= texts.len() {
        bail!("record {}: gold choice {gold} of {} choices", e.id, texts.len());
    }
    let labels: Vec<bool> = match field(e, "labels") {
        Some(l) => {
            let l: Vec<u8> = serde_json::from_str(l).with_context(|| format!("record {}: `labels` is not a list of 0/1", e.id))?;
            if l.len() != texts.len() {
                bail!("record {}: {} labels for {} choices", e.id, l.len(), texts.len());
            }
            l.into_iter().map(|x| x != 0).collect()
        }
        None => (0..texts.len()).map(|i| i == gold).collect(),
    };
    let shown = match task.choices {
        Some(Choices::Letters) => (0..texts.len()).map(letter).collect(),
        _ => texts,
    };
    Ok((shown, gold, labels))
}

/// The answer a few-shot example shows after its prompt.
fn target(task: &Task, e: &Example) -> anyhow::Result<String> {
    match &task.target {
        Some(t) => render(t, e),
        None => {
            let (texts, gold, _) = choices_of(task, e)?;
            Ok(texts[gold].clone())
        }
    }
}

/// Few-shot examples for the record at `index` from `pool`: never the record itself; only those sharing the
/// `same` field; the first `count` or a seeded draw.
pub fn shots<'p>(f: &Fewshot, pool: &'p [Example], own_pool: bool, e: &Example, index: usize) -> Vec<&'p Example> {
    let same = f.same.as_deref().map(|k| field(e, k));
    let candidates: Vec<&Example> = pool
        .iter()
        .filter(|p| !(own_pool && p.id == e.id))
        .filter(|p| same.is_none_or(|v| v.is_some() && field(p, f.same.as_deref().unwrap_or_default()) == v))
        .collect();
    match f.sampler {
        Sampler::FirstN => candidates.into_iter().take(f.count).collect(),
        Sampler::Random => {
            let mut rng = Rng::derive(f.seed, &format!("fewshot:{index}"));
            rng.sample_indices(candidates.len(), f.count).into_iter().map(|i| candidates[i]).collect()
        }
    }
}

/// Builds a record's context (with `shots` before it) and its answers.
pub fn build(task: &Task, e: &Example, shots: &[&Example]) -> anyhow::Result<Prompted> {
    let where_ = || format!("eval task `{}` ({})", task.name, task.file.display());
    let mut context = render(&task.description, e).with_context(|| format!("{}: `description`", where_()))?;
    for s in shots {
        context.push_str(&render(&task.prompt, s).with_context(|| format!("{}: `prompt` (few-shot)", where_()))?);
        context.push_str(&task.target_delimiter);
        context.push_str(&target(task, s).with_context(|| format!("{}: `target` (few-shot)", where_()))?);
        context.push_str(&task.fewshot_delimiter);
    }
    context.push_str(&render(&task.prompt, e).with_context(|| format!("{}: `prompt`", where_()))?);
    let mut p = Prompted { context, continuations: vec![], choice_texts: vec![], gold: 0, labels: vec![], references: vec![] };
    match task.kind {
        super::task::Kind::MultipleChoice => {
            let (texts, gold, labels) = choices_of(task, e).with_context(where_)?;
            p.continuations = texts.iter().map(|t| format!("{}{t}", task.target_delimiter)).collect();
            p.choice_texts = texts;
            p.gold = gold;
            p.labels = labels;
        }
        super::task::Kind::Generate => {
            let templates = task.references.clone().unwrap_or_else(|| task.target.iter().cloned().collect());
            p.references = templates
                .iter()
                .map(|t| render(t, e))
                .collect::<anyhow::Result<_>>()
                .with_context(|| format!("{}: `references`", where_()))?;
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(meta: &[(&str, &str)]) -> Example {
        Example {
            id: "r1".into(),
            dataset: "t".into(),
            turns: vec![],
            meta: meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn placeholders_filters_and_braces() {
        let e = rec(&[("q", "  Why?  "), ("subject", "high_school_biology"), ("choices", r#"["x","y"]"#)]);
        assert_eq!(render("{q|strip}|{subject|words}", &e).unwrap(), "Why?|high school biology");
        assert_eq!(render("{choices|lettered}", &e).unwrap(), "A. x\nB. y");
        assert_eq!(render("{{literal}} {id}", &e).unwrap(), "{literal} r1");
        let err = format!("{:#}", render("{nope}", &e).unwrap_err());
        assert!(err.contains("no field `nope`") && err.contains("subject"), "{err}");
        assert!(format!("{:#}", render("{q|shout}", &e).unwrap_err()).contains("unknown filter `shout`"));
        assert!(render("{q", &e).is_err() && render("a}b", &e).is_err());
        assert_eq!(letter(0), "A");
        assert_eq!(letter(25), "Z");
    }
}
