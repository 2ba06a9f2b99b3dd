//! The upgrade history `status` shows: the last records of this process and of the ones before
//! it, passed on to each successor.

/// How many upgrade records status keeps (and passes on to a successor).
const HISTORY_LEN: usize = 20;

/// One past upgrade, for status.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct UpgradeRecord {
    pub at_ms: u64,
    pub ok: bool,
    pub summary: String,
}

/// The last [`HISTORY_LEN`] upgrade records, oldest first.
#[derive(Debug, Default, serde::Serialize)]
#[serde(transparent)]
pub(super) struct History(Vec<UpgradeRecord>);

impl History {
    /// Adds a record stamped now.
    pub fn record(&mut self, ok: bool, summary: impl Into<String>) {
        self.0.push(UpgradeRecord {
            at_ms: crate::registry::now_ms(),
            ok,
            summary: summary.into(),
        });
        self.trim();
    }

    /// Puts a predecessor's records (oldest first) before this process's own.
    pub fn carry(&mut self, mut earlier: Vec<UpgradeRecord>) {
        earlier.append(&mut self.0);
        self.0 = earlier;
        self.trim();
    }

    /// The records as JSON values, for the handover's last message.
    pub fn to_values(&self) -> Vec<serde_json::Value> {
        self.0
            .iter()
            .filter_map(|r| serde_json::to_value(r).ok())
            .collect()
    }

    fn trim(&mut self) {
        let extra = self.0.len().saturating_sub(HISTORY_LEN);
        self.0.drain(..extra);
    }
}
