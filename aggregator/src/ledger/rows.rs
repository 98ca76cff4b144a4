//! Multi-row statements: the `VALUES (…), (…)` list of an INSERT that
//! writes many rows with one round trip, in either dialect.

use std::convert::Infallible;

use super::{
    LedgerError,
    tx::{Args, Insert, Tx, Write},
};

/// `rows` tuples of `template`, for SQLite, each `?` a parameter bound
/// by its place: `values(2, &["?", "NULLIF(?, -1.0)"])` is `(?,
/// NULLIF(?, -1.0)), (?, NULLIF(?, -1.0))` (bound by name, SQLite finds a
/// name in a list of all of them, which made binding a 650-parameter
/// statement cost more than running it: 40 % of the aggregator's CPU in
/// `sqlite3_bind_parameter_name`, BENCHMARKS.md § 6).
pub(super) fn values(rows: usize, template: &[&str]) -> String {
    let row = format!("({})", template.join(", "));
    let mut out = String::with_capacity(rows * (row.len() + 2));
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push_str(&row);
    }
    out
}

/// Writes `rows` into `into` (`table (columns)`): `template` is one
/// row's values, each `?` a parameter (`NULLIF(?, -1.0)` for an optional
/// double), `upsert` what follows the rows (an `ON CONFLICT` clause, or
/// nothing), and `bind` adds one row's values in the template's order.
///
/// Each driver keeps a few statement texts per table, prepared, whatever
/// the row count ([`Tx`]): PostgreSQL one (a column of rows is one array
/// parameter), SQLite at most five (runs of 16, 8, 4, 2 and 1 rows). A
/// text per row count, kept, once filled sqlx's
/// per-connection cache (100 statements, each pool connection its own)
/// with texts used once: reports of 1 to 150 tenants grew the aggregator
/// by 44 MiB (the 22-minute soak's +40 MiB/h, docs/faults.md).
pub(super) async fn insert<'a, T: 'a>(
    conn: &mut impl Tx,
    into: &'static str,
    template: &'static [&'static str],
    upsert: &'static str,
    rows: &'a [T],
    bind: impl Fn(&mut Args<'a>, &'a T) -> Result<(), Infallible>,
) -> Result<(), LedgerError> {
    conn.write_all(vec![write(into, template, upsert, rows, bind)])
        .await
}

/// The insert of [`insert`], to be run with others by [`Tx::write_all`].
pub(super) fn write<'a, I: IntoIterator>(
    into: &'static str,
    template: &'static [&'static str],
    upsert: &'static str,
    rows: I,
    bind: impl Fn(&mut Args<'a>, I::Item) -> Result<(), Infallible>,
) -> Write<'a>
where
    I::IntoIter: ExactSizeIterator,
{
    let rows = rows.into_iter();
    let count = rows.len();
    let mut args = Args::with_capacity(count * template.len());
    for row in rows {
        let Ok(()) = bind(&mut args, row);
    }
    Write::Insert(Insert {
        into,
        template,
        upsert,
        rows: count,
        args,
    })
}

#[cfg(test)]
mod tests {
    use sqlx::{Connection, Executor, PgConnection};

    use super::*;

    /// A connection to the test PostgreSQL that `cargo xtask test` starts
    /// (`TALLY_TEST_POSTGRES_URL`); says skipped without one.
    async fn test_postgres() -> Option<PgConnection> {
        let url = crate::ledger::chargeback::tests::postgres_server()?;
        Some(PgConnection::connect(&url).await.unwrap())
    }

    /// How many statements `conn` keeps prepared.
    async fn prepared(conn: &mut PgConnection) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM pg_prepared_statements")
            .persistent(false)
            .fetch_one(conn)
            .await
            .unwrap()
    }

    /// Runs on the test PostgreSQL that `cargo xtask test` starts
    /// (`TALLY_TEST_POSTGRES_URL`), whose `pg_prepared_statements` lists
    /// what the connection keeps prepared; says skipped without one.
    /// Inserts of 1 to 40 rows and of 100 store every value as it was
    /// bound (the extremes of each type, NULLs, texts with quotes), and
    /// keep one statement prepared, not one per row count.
    #[tokio::test]
    async fn postgres_rows_arrive_exactly_through_one_kept_statement() {
        let Some(mut conn) = test_postgres().await else {
            return;
        };
        Executor::execute(
            &mut conn,
            "CREATE TEMP TABLE t (n BIGINT, i BIGINT, v BIGINT, f DOUBLE PRECISION, s TEXT, \
             o TEXT, b BOOLEAN, PRIMARY KEY (n, i))",
        )
        .await
        .unwrap();
        let ints = [i64::MIN, -1, 0, 1, 9_007_199_254_740_993, i64::MAX];
        let floats = [
            0.1,
            -0.0,
            1e-300,
            f64::MIN_POSITIVE,
            f64::MAX,
            2.0f64.powi(60) + 1.0,
            1.0 / 3.0,
        ];
        let texts = [
            "plain",
            "",
            "quote \" and \\ backslash",
            "tab\tnewline\ncontrol\u{1}",
            "ünïcödé ✓ 𝄞",
            "{\"c0\": 1}",
        ];
        type Row = (i64, i64, i64, f64, String, Option<String>, bool);
        let row = |n: i64, i: i64| -> Row {
            let k = (n + i) as usize;
            (
                n,
                i,
                ints[k % ints.len()],
                floats[k % floats.len()],
                texts[k % texts.len()].to_owned(),
                (!k.is_multiple_of(3)).then(|| texts[(k + 1) % texts.len()].to_owned()),
                k.is_multiple_of(2),
            )
        };
        let before = prepared(&mut conn).await;
        let mut expected: Vec<Row> = Vec::new();
        for n in (1..=40i64).chain([100]) {
            let rows: Vec<Row> = (0..n).map(|i| row(n, i)).collect();
            insert(
                &mut conn,
                "t (n, i, v, f, s, o, b)",
                &["?"; 7],
                "",
                &rows,
                |a, (n, i, v, f, s, o, b)| {
                    a.add(*n)?;
                    a.add(*i)?;
                    a.add(*v)?;
                    a.add(*f)?;
                    a.add(s)?;
                    a.add(o.as_deref())?;
                    a.add(*b)
                },
            )
            .await
            .unwrap();
            expected.extend(rows);
        }
        let stored: Vec<Row> = sqlx::query_as("SELECT n, i, v, f, s, o, b FROM t ORDER BY n, i")
            .persistent(false)
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert_eq!(stored.len(), expected.len(), "every row once");
        for (s, e) in stored.iter().zip(&expected) {
            assert_eq!(
                (s.0, s.1, s.2, &s.4, &s.5, s.6),
                (e.0, e.1, e.2, &e.4, &e.5, e.6)
            );
            assert_eq!(s.3.to_bits(), e.3.to_bits(), "every bit of {} kept", e.3);
        }
        assert_eq!(
            prepared(&mut conn).await - before,
            1,
            "one text whatever the rows"
        );

        // An upsert's rows arrive the same way.
        insert(
            &mut conn,
            "t (n, i, v, f, s, o, b)",
            &["?"; 7],
            "ON CONFLICT (n, i) DO UPDATE SET f = t.f + excluded.f",
            &[(1i64, 0i64, 0.5)],
            |a, (n, i, f)| {
                a.add(*n)?;
                a.add(*i)?;
                a.add(0)?;
                a.add(*f)?;
                a.add("x")?;
                a.add(None::<&str>)?;
                a.add(false)
            },
        )
        .await
        .unwrap();
        let f: f64 = sqlx::query_scalar("SELECT f FROM t WHERE n = 1")
            .persistent(false)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(f, row(1, 0).3 + 0.5);
    }

    /// A report's writes on PostgreSQL: a delete, inserts (one an upsert,
    /// one of no rows) and a one-row statement run as one prepared
    /// statement, every row as bound; run again, with 40 or 1,000 rows,
    /// the same statement.
    #[tokio::test]
    async fn postgres_writes_of_a_report_are_one_statement() {
        let Some(mut conn) = test_postgres().await else {
            return;
        };
        for sql in [
            "CREATE TEMP TABLE q (node TEXT)",
            "INSERT INTO q VALUES ('n'), ('other')",
            "CREATE TEMP TABLE r (k BIGINT, v DOUBLE PRECISION, s TEXT)",
            "CREATE TEMP TABLE u (k TEXT PRIMARY KEY, n BIGINT)",
            "CREATE TEMP TABLE b (k TEXT PRIMARY KEY, n BIGINT)",
        ] {
            Executor::execute(&mut conn, sql).await.unwrap();
        }
        let raw = |from: i64, n: i64| -> Vec<(i64, f64, String)> {
            (from..from + n)
                .map(|k| (k, k as f64 / 3.0, format!("row '{k}'")))
                .collect()
        };
        let writes = |r: &[(i64, f64, String)]| -> Vec<Write<'static>> {
            let r: Vec<(i64, f64, String)> = r.to_vec();
            vec![
                Write::Execute {
                    sql: "DELETE FROM q WHERE node = $1",
                    args: crate::ledger::tx::args(["n".into()]),
                },
                write("r (k, v, s)", &["?"; 3], "", r, |a, (k, v, s)| {
                    a.add(k)?;
                    a.add(v)?;
                    a.add(s)
                }),
                write(
                    "u (k, n)",
                    &["?"; 2],
                    "ON CONFLICT (k) DO UPDATE SET n = u.n + excluded.n",
                    [("a", 1i64), ("b", 10)],
                    |a, (k, n)| {
                        a.add(k)?;
                        a.add(n)
                    },
                ),
                write("r (k, v, s)", &["?"; 3], "", Vec::<i64>::new(), |a, k| {
                    a.add(k)
                }),
                Write::Execute {
                    sql: "INSERT INTO b AS t (k, n) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE \
                          SET n = t.n + excluded.n",
                    args: crate::ledger::tx::args(["boot".into(), 1.into()]),
                },
            ]
        };
        let before = prepared(&mut conn).await;
        let mut expected = raw(0, 50);
        conn.write_all(writes(&expected)).await.unwrap();
        assert_eq!(prepared(&mut conn).await - before, 1, "one statement");
        let more = raw(50, 40);
        conn.write_all(writes(&more)).await.unwrap();
        expected.extend(more);
        assert_eq!(prepared(&mut conn).await - before, 1, "the same one again");
        // Many rows: still the one statement.
        let many = raw(90, 1000);
        conn.write_all(writes(&many)).await.unwrap();
        expected.extend(many);
        assert_eq!(prepared(&mut conn).await - before, 1, "and for many rows");

        let stored: Vec<(i64, f64, String)> = sqlx::query_as("SELECT k, v, s FROM r ORDER BY k")
            .persistent(false)
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert_eq!(stored.len(), expected.len(), "every row once");
        for (s, e) in stored.iter().zip(&expected) {
            assert_eq!((s.0, &s.2), (e.0, &e.2));
            assert_eq!(s.1.to_bits(), e.1.to_bits());
        }
        let counts: Vec<(String, i64)> =
            sqlx::query_as("SELECT k, n FROM u UNION ALL SELECT k, n FROM b ORDER BY k")
                .persistent(false)
                .fetch_all(&mut conn)
                .await
                .unwrap();
        assert_eq!(
            counts,
            [("a".into(), 3), ("b".into(), 30), ("boot".into(), 3)]
        );
        let left: Vec<String> = sqlx::query_scalar("SELECT node FROM q")
            .persistent(false)
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert_eq!(left, ["other"]);
    }

    #[test]
    fn sqlite_rows_are_positional() {
        assert_eq!(
            values(2, &["?", "NULLIF(?, -1.0)"]),
            "(?, NULLIF(?, -1.0)), (?, NULLIF(?, -1.0))"
        );
        assert_eq!(values(1, &["?"; 3]), "(?, ?, ?)");
    }
}
