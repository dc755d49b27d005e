//! The five kinds of plugin and how each shows itself in a component's exports.
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginKind {
    Source,
    Filter,
    Template,
    Scheduler,
    /// Scores generations in `lorahost eval` (contract 0.1.1 on).
    Scorer,
}

impl PluginKind {
    pub const ALL: [PluginKind; 5] =
        [PluginKind::Source, PluginKind::Filter, PluginKind::Template, PluginKind::Scheduler, PluginKind::Scorer];

    pub fn name(self) -> &'static str {
        match self {
            PluginKind::Source => "source",
            PluginKind::Filter => "filter",
            PluginKind::Template => "template",
            PluginKind::Scheduler => "scheduler",
            PluginKind::Scorer => "scorer",
        }
    }

    /// The interface a component of this kind exports, without the version: `filter-api` and so on.
    pub fn interface(self) -> &'static str {
        match self {
            PluginKind::Source => "source-api",
            PluginKind::Filter => "filter-api",
            PluginKind::Template => "template-api",
            PluginKind::Scheduler => "scheduler-api",
            PluginKind::Scorer => "scorer-api",
        }
    }

    pub fn parse(s: &str) -> Option<PluginKind> {
        PluginKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
