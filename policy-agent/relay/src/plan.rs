//! The order rows are published in, and what a batch's results mean — pure, so the ordering
//! guarantee is tested without a database or a broker.
//!
//! With `ordering: PerAggregate` a batch is published in *waves*: wave `k` holds the `k`-th
//! row of every aggregate in the batch, and is sent only after wave `k-1` was acknowledged.
//! Rows of different aggregates travel together; rows of one aggregate never overtake each
//! other, and once a row fails, the later rows of its aggregate wait for the next batch (and
//! its aggregate for its backoff). With `ordering: None` the batch is one wave.

use std::collections::{BTreeMap, BTreeSet};

use breakwater_api::outbox_relay::Ordering;

/// One outbox row, its columns as text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub kind: String,
    pub payload: String,
    /// A JSON object of strings, when the table has a `headers` column.
    pub headers: Option<String>,
}

impl Row {
    /// `aggregatetype/aggregateid`: what order is kept within.
    pub fn aggregate(&self) -> String {
        format!("{}/{}", self.aggregate_type, self.aggregate_id)
    }

    /// The headers as name/value pairs (an unreadable value is left out, not fatal: the
    /// payload is what the row carries).
    pub fn header_pairs(&self) -> Vec<(String, String)> {
        let Some(text) = &self.headers else { return Vec::new() };
        match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text) {
            Ok(map) => map
                .into_iter()
                .filter_map(|(name, value)| match value {
                    serde_json::Value::String(text) => Some((name, text)),
                    serde_json::Value::Null => None,
                    other => Some((name, other.to_string())),
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// A destination template with `{aggregateType}` and `{type}` filled in from the row.
    pub fn destination(&self, template: &str) -> String {
        template.replace("{aggregateType}", &self.aggregate_type).replace("{type}", &self.kind)
    }
}

/// The waves of a batch (indexes into `rows`, which are in the table's order).
pub fn waves(rows: &[Row], ordering: Ordering) -> Vec<Vec<usize>> {
    if ordering == Ordering::None {
        return if rows.is_empty() { Vec::new() } else { vec![(0..rows.len()).collect()] };
    }
    let mut position: BTreeMap<String, usize> = BTreeMap::new();
    let mut waves: Vec<Vec<usize>> = Vec::new();
    for (index, row) in rows.iter().enumerate() {
        let nth = position.entry(row.aggregate()).or_insert(0);
        if waves.len() <= *nth {
            waves.push(Vec::new());
        }
        waves[*nth].push(index);
        *nth += 1;
    }
    waves
}

/// What happened to a batch: rows the sink acknowledged, rows that failed (with the error),
/// and rows not tried because an earlier row of their aggregate failed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub published: Vec<String>,
    pub failed: Vec<(String, String)>,
    pub held_back: Vec<String>,
}

impl Outcome {
    /// The aggregates that must wait: those with a failed row (with PerAggregate ordering).
    pub fn blocked(&self, rows: &[Row], ordering: Ordering) -> BTreeSet<String> {
        if ordering == Ordering::None {
            return BTreeSet::new();
        }
        let failed: BTreeSet<&str> = self.failed.iter().map(|(id, _)| id.as_str()).collect();
        rows.iter().filter(|row| failed.contains(row.id.as_str())).map(Row::aggregate).collect()
    }
}

/// Runs a batch through `publish` wave by wave: `publish` gets the rows of one wave and
/// returns one result per row, in order.
pub async fn run<'a, F, Fut>(rows: &'a [Row], ordering: Ordering, mut publish: F) -> Outcome
where
    F: FnMut(Vec<&'a Row>) -> Fut,
    Fut: Future<Output = Vec<Result<(), String>>>,
{
    let mut outcome = Outcome::default();
    let mut stopped: BTreeSet<String> = BTreeSet::new();
    for wave in waves(rows, ordering) {
        let (go, wait): (Vec<usize>, Vec<usize>) =
            wave.into_iter().partition(|&i| !stopped.contains(&rows[i].aggregate()));
        outcome.held_back.extend(wait.into_iter().map(|i| rows[i].id.clone()));
        if go.is_empty() {
            continue;
        }
        let results = publish(go.iter().map(|&i| &rows[i]).collect()).await;
        for (position, &index) in go.iter().enumerate() {
            let row = &rows[index];
            match results.get(position) {
                Some(Ok(())) => outcome.published.push(row.id.clone()),
                Some(Err(error)) => {
                    outcome.failed.push((row.id.clone(), error.clone()));
                    if ordering == Ordering::PerAggregate {
                        stopped.insert(row.aggregate());
                    }
                }
                None => {
                    outcome.failed.push((row.id.clone(), "the sink gave no result".to_string()));
                    stopped.insert(row.aggregate());
                }
            }
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn row(id: usize, aggregate: usize) -> Row {
        Row {
            id: format!("{id:08}"),
            aggregate_type: "order".into(),
            aggregate_id: aggregate.to_string(),
            kind: "Created".into(),
            payload: "{}".into(),
            headers: None,
        }
    }

    fn block_on<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(future)
    }

    #[test]
    fn a_wave_holds_one_row_per_aggregate() {
        let rows = [row(1, 1), row(2, 1), row(3, 2), row(4, 1), row(5, 3)];
        assert_eq!(waves(&rows, Ordering::PerAggregate), vec![vec![0, 2, 4], vec![1], vec![3]]);
        assert_eq!(waves(&rows, Ordering::None), vec![vec![0, 1, 2, 3, 4]]);
        assert!(waves(&[], Ordering::PerAggregate).is_empty());
    }

    #[test]
    fn a_failure_holds_back_its_aggregate_only() {
        let rows = [row(1, 1), row(2, 1), row(3, 2), row(4, 2), row(5, 1)];
        let outcome = block_on(run(&rows, Ordering::PerAggregate, |wave| {
            let results = wave
                .iter()
                .map(|r| if r.id == "00000001" { Err("down".to_string()) } else { Ok(()) })
                .collect();
            async move { results }
        }));
        assert_eq!(outcome.published, ["00000003", "00000004"]);
        assert_eq!(outcome.failed, [("00000001".to_string(), "down".to_string())]);
        assert_eq!(outcome.held_back, ["00000002", "00000005"]);
        assert_eq!(outcome.blocked(&rows, Ordering::PerAggregate), BTreeSet::from(["order/1".to_string()]));
    }

    #[test]
    fn destinations_and_headers_come_from_the_row() {
        let mut r = row(1, 1);
        assert_eq!(r.destination("events.{aggregateType}.{type}"), "events.order.Created");
        r.headers = Some(r#"{"trace":"abc","n":1,"gone":null}"#.into());
        assert_eq!(
            r.header_pairs(),
            [("n".to_string(), "1".to_string()), ("trace".to_string(), "abc".to_string())]
        );
        r.headers = Some("not json".into());
        assert!(r.header_pairs().is_empty());
    }

    proptest! {
        /// Whatever fails, what an aggregate publishes is a prefix of its rows in order, and
        /// every row is published, failed or held back exactly once.
        #[test]
        fn each_aggregate_publishes_a_prefix_in_order(
            aggregates in proptest::collection::vec(0usize..4, 0..40),
            failing in proptest::collection::btree_set(0usize..40, 0..6),
        ) {
            let rows: Vec<Row> = aggregates.iter().enumerate().map(|(i, &a)| row(i, a)).collect();
            let outcome = block_on(run(&rows, Ordering::PerAggregate, |wave| {
                let results: Vec<Result<(), String>> = wave.iter().map(|r| {
                    let index: usize = r.id.parse().unwrap_or(0);
                    if failing.contains(&index) { Err("no".to_string()) } else { Ok(()) }
                }).collect();
                async move { results }
            }));
            let total = outcome.published.len() + outcome.failed.len() + outcome.held_back.len();
            prop_assert_eq!(total, rows.len());
            for aggregate in 0..4 {
                let of: Vec<&Row> = rows.iter().filter(|r| r.aggregate_id == aggregate.to_string()).collect();
                let published: Vec<&String> = outcome.published.iter().filter(|id| of.iter().any(|r| &r.id == *id)).collect();
                let prefix: Vec<&String> = of.iter().take(published.len()).map(|r| &r.id).collect();
                prop_assert_eq!(published, prefix);
            }
        }
    }
}
