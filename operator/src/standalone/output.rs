//! How standalone mode prints its outcome: a `kubectl get`-like table, or JSON objects with
//! the status the API server would hold.

use serde_json::Value;

use super::Row;

fn condition<'a>(
    row: &'a Row,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    row.status.conditions.iter().find(|c| c.type_ == type_)
}

/// The condition that says most about a row: the first of Accepted and ResolvedRefs that is
/// False, else Accepted.
fn headline(row: &Row) -> (&str, &str) {
    let failing = ["Accepted", "ResolvedRefs"]
        .into_iter()
        .filter_map(|t| condition(row, t))
        .find(|c| c.status != "True");
    failing
        .or_else(|| condition(row, "Accepted"))
        .map_or(("", ""), |c| (c.reason.as_str(), c.message.as_str()))
}

pub fn table(rows: &[Row]) -> String {
    let status = |row: &Row, t: &str| condition(row, t).map_or("-".to_string(), |c| c.status.clone());
    let mut lines = vec![
        ["NAMESPACE", "NAME", "TARGETS", "ACCEPTED", "RESOLVED", "PROGRAMMED", "REASON", "MESSAGE"]
            .map(String::from),
    ];
    for row in rows {
        let (reason, message) = headline(row);
        lines.push([
            row.name.namespace.clone(),
            format!("{}/{}", row.kind.to_lowercase(), row.name.name),
            row.status.targets.map_or("-".to_string(), |t| t.to_string()),
            status(row, "Accepted"),
            status(row, "ResolvedRefs"),
            status(row, "Programmed"),
            reason.to_string(),
            message.to_string(),
        ]);
    }
    let mut widths = [0; 8];
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    lines
        .iter()
        .map(|line| {
            let cells: Vec<String> =
                line.iter().zip(widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
            cells.join("   ").trim_end().to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every object with its status, as `kubectl get -o json` prints a list.
pub fn json(rows: &[Row]) -> String {
    let items: Vec<Value> = rows
        .iter()
        .map(|row| {
            let mut object = row.object.clone();
            if let Some(map) = object.as_object_mut() {
                map.insert("status".into(), serde_json::to_value(&row.status).unwrap_or_default());
            }
            object
        })
        .collect();
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    serde_json::to_string_pretty(&list).unwrap_or_default()
}
