//! Multi-row statements: the `VALUES (…), (…)` list of an INSERT that
//! writes many rows with one round trip, in either dialect.

use sqlx::{AnyConnection, any::AnyArguments, error::BoxDynError};

/// Whether `conn` takes numbered parameters (PostgreSQL) rather than
/// plain `?` (SQLite).
fn numbered(conn: &AnyConnection) -> bool {
    conn.backend_name() != "SQLite"
}

/// Most rows in one statement: keeps the bound parameters far below
/// SQLite's 32,766 and PostgreSQL's 65,535.
const MAX_ROWS: usize = 1000;

/// `rows` tuples of `template`, whose every `?` becomes the next numbered
/// parameter (`$1`, `$2`, …) where `numbered`: `values(2, &["?",
/// "NULLIF(?, -1.0)"], true)` is `($1, NULLIF($2, -1.0)), ($3, NULLIF($4,
/// -1.0))`. SQLite gets plain `?`: sqlx looks up every parameter's name,
/// and SQLite finds a name in a list of all of them, which made binding a
/// 650-parameter statement cost more than running it (40 % of the
/// aggregator's CPU in `sqlite3_bind_parameter_name`, BENCHMARKS.md § 6).
fn values(rows: usize, template: &[&str], numbered: bool) -> String {
    let mut out = String::with_capacity(rows * template.len() * 6);
    let mut n = 0;
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for (c, col) in template.iter().enumerate() {
            if c > 0 {
                out.push_str(", ");
            }
            for ch in col.chars() {
                if ch == '?' && numbered {
                    n += 1;
                    out.push('$');
                    out.push_str(&n.to_string());
                } else {
                    out.push(ch);
                }
            }
        }
        out.push(')');
    }
    out
}

/// `count` plain placeholders: a tuple template for [`values`].
pub(super) fn plain(count: usize) -> Vec<&'static str> {
    vec!["?"; count]
}

/// Writes `rows` with one `INSERT INTO {into} VALUES (…), (…) {upsert}`
/// per [`MAX_ROWS`] of them: `template` is one row's placeholders (see
/// [`values`]), `upsert` what follows the list (an `ON CONFLICT` clause,
/// or nothing), and `bind` adds one row's values in the template's order.
pub(super) async fn insert<'a, T>(
    conn: &mut AnyConnection,
    into: &str,
    template: &[&str],
    upsert: &str,
    rows: &'a [T],
    bind: impl Fn(&mut AnyArguments<'a>, &'a T) -> Result<(), BoxDynError>,
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(MAX_ROWS) {
        let sql = format!(
            "INSERT INTO {into} VALUES {} {upsert}",
            values(chunk.len(), template, numbered(conn))
        );
        let mut args = AnyArguments::default();
        for row in chunk {
            bind(&mut args, row).map_err(sqlx::Error::Encode)?;
        }
        sqlx::query_with(&sql, args).execute(&mut *conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_numbered_across_rows() {
        assert_eq!(
            values(2, &["?", "NULLIF(?, -1.0)"], true),
            "($1, NULLIF($2, -1.0)), ($3, NULLIF($4, -1.0))"
        );
        assert_eq!(values(1, &plain(3), true), "($1, $2, $3)");
        assert_eq!(values(2, &plain(2), false), "(?, ?), (?, ?)");
    }
}
