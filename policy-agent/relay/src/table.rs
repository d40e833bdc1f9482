//! The SQL the relay runs, built from the table names of the `OutboxRelay` (which the CRD
//! already restricts to `[schema.]name` of lowercase letters, digits and `_`; they are quoted
//! here all the same). Pure: tests read the statements.
//!
//! The outbox table has Debezium's layout — `id uuid`, `aggregatetype`, `aggregateid`,
//! `type` (text types), `payload jsonb` — and may add `created_at timestamptz` (the order of
//! an aggregate's rows: without it, rows are ordered by `id`, so ids must then grow, as
//! UUIDv7 ids do) and `headers jsonb` (an object of strings, passed on as message headers).
//! With `afterPublish: MarkPublished` it also needs `published_at timestamptz` (NULL until
//! published).
//!
//! The relay keeps two tables of its own next to the outbox, created if missing:
//! `breakwater_outbox_fence` (one row per relay: the highest fencing token that committed)
//! and `breakwater_outbox_attempts` (failed attempts per row, kept across relay restarts).

use std::fmt::Write;

/// Columns every outbox table has.
pub const REQUIRED: [&str; 5] = ["id", "aggregatetype", "aggregateid", "type", "payload"];
pub const CREATED_AT: &str = "created_at";
pub const HEADERS: &str = "headers";
pub const PUBLISHED_AT: &str = "published_at";

pub const FENCE_TABLE: &str = "breakwater_outbox_fence";
pub const ATTEMPTS_TABLE: &str = "breakwater_outbox_attempts";

/// `"schema"."name"` (or `"name"`).
pub fn quote(table: &str) -> String {
    table.split('.').map(|part| format!("\"{}\"", part.replace('"', "\"\""))).collect::<Vec<_>>().join(".")
}

/// The schema (default `public`) and name of `table`.
pub fn split(table: &str) -> (&str, &str) {
    table.split_once('.').unwrap_or(("public", table))
}

/// The optional columns an outbox table has, found at start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    pub created_at: bool,
    pub headers: bool,
    pub published_at: bool,
}

impl Layout {
    /// What is wrong with a table of `columns` for this relay, or the layout.
    pub fn check(columns: &[String], mark_published: bool) -> Result<Self, String> {
        let missing: Vec<&str> =
            REQUIRED.iter().copied().filter(|c| !columns.iter().any(|have| have == c)).collect();
        let has = |name: &str| columns.iter().any(|c| c == name);
        if !missing.is_empty() {
            return Err(format!("missing column(s) {}", missing.join(", ")));
        }
        if mark_published && !has(PUBLISHED_AT) {
            return Err(format!("afterPublish MarkPublished needs a column {PUBLISHED_AT} timestamptz"));
        }
        Ok(Layout { created_at: has(CREATED_AT), headers: has(HEADERS), published_at: has(PUBLISHED_AT) })
    }

    fn order(&self) -> &'static str {
        if self.created_at { "created_at, id" } else { "id" }
    }
}

/// The statements for one outbox table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statements {
    /// `$1` the batch size, `$2` the aggregates (`aggregatetype/aggregateid`) to leave out.
    pub select: String,
    /// `$1` the ids.
    pub done: String,
    /// `$1` the relay, `$2` the ids, `$3` their errors: counts a failed attempt.
    pub attempt: String,
    /// `$1` the relay, `$2` the ids: forget the attempts of rows that left the table.
    pub forget: String,
    /// `$1` the relay, `$2` the ids: copies parked rows to the dead-letter table.
    pub park: Option<String>,
    /// `$1` the ids: parked rows leave the outbox (whatever `afterPublish` says).
    pub remove: String,
    /// Moves every parked row back to the end of its aggregate (replay).
    pub replay: Option<String>,
    /// `$1` the relay, `$2` the token: holds the fence for this transaction, or no row when
    /// a newer token committed.
    pub fence: String,
    /// `$1` the relay: pending rows and the age of the oldest, in seconds.
    pub backlog: String,
}

/// The columns a batch reads, in this order: id, aggregatetype, aggregateid, type, payload,
/// headers (or NULL), all as text.
pub fn statements(
    table: &str,
    dead_letter: Option<&str>,
    layout: Layout,
    mark_published: bool,
) -> Statements {
    let outbox = quote(table);
    let pending = if mark_published { " WHERE published_at IS NULL" } else { "" };
    let headers = if layout.headers { "headers::text" } else { "NULL::text" };
    let and = if mark_published { "AND" } else { "WHERE" };
    let mut select = format!(
        "SELECT id::text, aggregatetype::text, aggregateid::text, type::text, payload::text, {headers} FROM {outbox}{pending} "
    );
    let _ = write!(
        select,
        "{and} NOT ((aggregatetype::text || '/' || aggregateid::text) = ANY($2::text[])) ORDER BY {} LIMIT $1",
        layout.order()
    );
    let done = if mark_published {
        format!("UPDATE {outbox} SET published_at = now() WHERE id = ANY($1::text[]::uuid[])")
    } else {
        format!("DELETE FROM {outbox} WHERE id = ANY($1::text[]::uuid[])")
    };
    let park = dead_letter.map(|dlq| {
        let dlq = quote(dlq);
        format!(
            "INSERT INTO {dlq} (id, aggregatetype, aggregateid, type, payload, attempts, last_error, parked_at) \
             SELECT o.id, o.aggregatetype, o.aggregateid, o.type, o.payload, a.attempts, a.last_error, now() \
             FROM {outbox} o JOIN {ATTEMPTS_TABLE} a ON a.id = o.id AND a.relay = $1 \
             WHERE o.id = ANY($2::text[]::uuid[]) ON CONFLICT (id) DO NOTHING"
        )
    });
    // One statement: a row parked while the replay runs is either moved or stays parked.
    let replay = dead_letter.map(|dlq| {
        let dlq = quote(dlq);
        let created = if layout.created_at { ", created_at" } else { "" };
        let now = if layout.created_at { ", now()" } else { "" };
        format!(
            "WITH moved AS (DELETE FROM {dlq} RETURNING id, aggregatetype, aggregateid, type, payload) \
             INSERT INTO {outbox} (id, aggregatetype, aggregateid, type, payload{created}) \
             SELECT id, aggregatetype, aggregateid, type, payload{now} FROM moved ON CONFLICT (id) DO NOTHING"
        )
    });
    let age = if layout.created_at {
        "COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0)"
    } else {
        "0::float8"
    };
    Statements {
        select,
        done,
        attempt: format!(
            "INSERT INTO {ATTEMPTS_TABLE} (relay, id, attempts, last_error) \
             SELECT $1, u.id, 1, u.error FROM unnest($2::text[]::uuid[], $3::text[]) AS u(id, error) \
             ON CONFLICT (relay, id) DO UPDATE SET attempts = {ATTEMPTS_TABLE}.attempts + 1, last_error = excluded.last_error \
             RETURNING id::text, attempts"
        ),
        forget: format!("DELETE FROM {ATTEMPTS_TABLE} WHERE relay = $1 AND id = ANY($2::text[]::uuid[])"),
        park,
        remove: format!("DELETE FROM {outbox} WHERE id = ANY($1::text[]::uuid[])"),
        replay,
        fence: format!(
            "UPDATE {FENCE_TABLE} SET token = $2, committed_at = now() WHERE relay = $1 AND token <= $2 RETURNING token"
        ),
        backlog: format!("SELECT count(*)::int8, {age} FROM {outbox}{pending}"),
    }
}

/// The relay's own tables; idempotent.
pub fn setup() -> [String; 2] {
    [
        format!(
            "CREATE TABLE IF NOT EXISTS {FENCE_TABLE} (relay text PRIMARY KEY, token bigint NOT NULL, committed_at timestamptz)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {ATTEMPTS_TABLE} (relay text NOT NULL, id uuid NOT NULL, attempts int NOT NULL, \
             last_error text, PRIMARY KEY (relay, id))"
        ),
    ]
}

/// The fence row of `$1`, created at token 0 if missing. The existence check reads without
/// locking, so a replica starting while the holder has the row locked does not wait for it.
pub const FENCE_ROW: &str = "INSERT INTO breakwater_outbox_fence (relay, token) SELECT $1, 0 \
     WHERE NOT EXISTS (SELECT 1 FROM breakwater_outbox_fence WHERE relay = $1) ON CONFLICT (relay) DO NOTHING";

/// The dead-letter table, created if missing: the outbox's columns, the attempts, the last
/// error and when the row was parked.
pub fn dead_letter_table(dlq: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (id uuid PRIMARY KEY, aggregatetype text NOT NULL, aggregateid text NOT NULL, \
         type text NOT NULL, payload jsonb, attempts int NOT NULL, last_error text, parked_at timestamptz NOT NULL)",
        quote(dlq)
    )
}

/// The columns of `table` (schema `$1`, name `$2`).
pub const COLUMNS: &str =
    "SELECT column_name::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2";

#[cfg(test)]
mod tests {
    use super::*;

    fn columns(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_table_without_a_required_column_is_named() {
        let err =
            Layout::check(&columns(&["id", "aggregatetype", "type", "payload"]), false).expect_err("missing");
        assert_eq!(err, "missing column(s) aggregateid");
        let err = Layout::check(&columns(&REQUIRED), true).expect_err("no published_at");
        assert!(err.contains("published_at"), "{err}");
        let layout = Layout::check(
            &columns(&["id", "aggregatetype", "aggregateid", "type", "payload", "created_at"]),
            false,
        );
        assert_eq!(layout, Ok(Layout { created_at: true, headers: false, published_at: false }));
    }

    #[test]
    fn rows_are_ordered_by_created_at_when_there_is_one() {
        let with = statements("public.outbox", None, Layout { created_at: true, ..Layout::default() }, false);
        assert!(with.select.ends_with("ORDER BY created_at, id LIMIT $1"), "{}", with.select);
        let without = statements("outbox", None, Layout::default(), false);
        assert!(without.select.ends_with("ORDER BY id LIMIT $1"), "{}", without.select);
        assert!(without.select.contains("FROM \"outbox\" WHERE NOT"), "{}", without.select);
    }

    #[test]
    fn mark_published_updates_and_selects_the_unpublished() {
        let s = statements(
            "shop.outbox",
            Some("shop.outbox_dlq"),
            Layout { published_at: true, ..Layout::default() },
            true,
        );
        assert!(
            s.select.contains("FROM \"shop\".\"outbox\" WHERE published_at IS NULL AND NOT"),
            "{}",
            s.select
        );
        assert!(s.done.starts_with("UPDATE \"shop\".\"outbox\" SET published_at = now()"), "{}", s.done);
        assert!(s.park.as_deref().is_some_and(|p| p.starts_with("INSERT INTO \"shop\".\"outbox_dlq\"")));
    }

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote("a.b"), "\"a\".\"b\"");
        assert_eq!(quote("x\"y"), "\"x\"\"y\"");
        assert_eq!(split("outbox"), ("public", "outbox"));
    }
}
