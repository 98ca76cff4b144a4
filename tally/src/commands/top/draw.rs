//! Draws a [`View`] with ratatui: a title line, the GPU table, the tenant
//! table and a line of keys, laid out to be readable at 80×24.

use ratatui::{
    Frame,
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Cell, Row, Table},
};

use super::model::{GpuRow, SortKey, TenantRow, View};

/// What the frame says besides the data.
pub(crate) struct Status<'a> {
    pub source: &'a str,
    pub interval: std::time::Duration,
    pub sort: SortKey,
    pub reverse: bool,
    /// The last fetch's error, shown while the previous data stays up.
    pub error: Option<&'a str>,
}

pub(crate) fn frame(f: &mut Frame<'_>, view: &View, status: &Status<'_>) {
    let gpu_rows = (view.gpus.len() as u16).max(1) + 3;
    let [title, gpus, tenants, keys] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Max(gpu_rows),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .areas(f.area());

    let refresh = humantime::format_duration(status.interval);
    let head = match status.error {
        Some(e) => Line::styled(
            format!("tally top · {} · {e}", status.source),
            Style::new().fg(Color::Red),
        ),
        None => Line::from(format!(
            "tally top · {} · {} · every {refresh}",
            view.scope, status.source
        )),
    };
    f.render_widget(head, title);
    f.render_widget(gpu_table(&view.gpus), gpus);
    f.render_widget(tenant_table(&view.tenants, status), tenants);
    f.render_widget(
        Line::styled(
            "q quit  sort: t tenant g gpu m mem e energy n net p pcie u quota  r reverse",
            Style::new().add_modifier(Modifier::DIM),
        ),
        keys,
    );
}

fn header(cells: &[&'static str]) -> Row<'static> {
    Row::new(cells.iter().copied()).style(Style::new().add_modifier(Modifier::BOLD))
}

fn gpu_table(rows: &[GpuRow]) -> Table<'static> {
    let body = rows.iter().map(|g| {
        let colour = match g.state.as_str() {
            "busy" => Color::Green,
            "idle" => Color::Yellow,
            "stuck" | "lost" | "stale" => Color::Red,
            _ => Color::Reset,
        };
        Row::new(vec![
            Cell::from(g.id.clone()),
            Cell::from(g.state.clone()).style(Style::new().fg(colour)),
            Cell::from(
                g.utilization
                    .map_or("-".into(), |u| format!("{:.0}%", u * 100.0)),
            ),
            Cell::from(format!(
                "{}/{}",
                bytes(g.memory_used as f64),
                bytes(g.memory_total as f64)
            )),
            Cell::from(g.power_watts.map_or("-".into(), |w| format!("{w:.0}W"))),
            Cell::from(g.tenants.join(",")),
        ])
    });
    Table::new(
        body,
        [
            Constraint::Length(12),
            Constraint::Length(6),
            Constraint::Length(5),
            Constraint::Length(13),
            Constraint::Length(6),
            Constraint::Min(10),
        ],
    )
    .header(header(&[
        "GPU", "STATE", "UTIL", "MEMORY", "POWER", "TENANTS",
    ]))
    .block(Block::new().borders(Borders::TOP).title("GPUs"))
}

fn tenant_table(rows: &[TenantRow], status: &Status<'_>) -> Table<'static> {
    let body = rows.iter().map(|t| {
        let quota = match &t.quota {
            None => Cell::from("-"),
            Some((res, r)) if r.is_nan() => Cell::from(format!("? {res}")),
            Some((res, r)) if *r > 1.0 => Cell::from(format!("OVER {res}"))
                .style(Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)),
            Some((res, r)) => Cell::from(format!("{:.0}% {res}", r * 100.0)),
        };
        Row::new(vec![
            Cell::from(t.tenant.clone()),
            Cell::from(t.gpu_share.map_or("-".into(), |s| format!("{s:.2}"))),
            Cell::from(bytes(t.memory as f64)),
            Cell::from(t.power_watts.map_or("-".into(), |w| format!("{w:.0}W"))),
            Cell::from(rate(t.net_in)),
            Cell::from(rate(t.net_out)),
            Cell::from(rate(t.pcie)),
            quota,
        ])
    });
    let arrow = if status.reverse { "↑" } else { "↓" };
    Table::new(
        body,
        [
            Constraint::Length(14),
            Constraint::Length(5),
            Constraint::Length(6),
            Constraint::Length(6),
            Constraint::Length(8),
            Constraint::Length(6),
            Constraint::Length(6),
            Constraint::Min(12),
        ],
    )
    .header(header(&[
        "TENANT", "GPUS", "MEM", "ENERGY", "NET IN/s", "OUT/s", "PCIE/s", "QUOTA",
    ]))
    .block(
        Block::new()
            .borders(Borders::TOP)
            .title(format!("Tenants (by {} {arrow})", status.sort.label())),
    )
}

/// Bytes in at most 5 characters: `512B`, `12.0K`, `79.6G`.
pub(crate) fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = n.max(0.0);
    let mut i = 0;
    while v >= 1000.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0}B")
    } else if v >= 100.0 {
        format!("{v:.0}{}", UNITS[i])
    } else {
        format!("{v:.1}{}", UNITS[i])
    }
}

fn rate(n: Option<f64>) -> String {
    n.map_or("-".into(), bytes)
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend};

    use super::*;

    #[test]
    fn bytes_fit_in_six_characters() {
        assert_eq!(bytes(512.0), "512B");
        assert_eq!(bytes(8.0 * 1024.0 * 1024.0 * 1024.0), "8.0G");
        assert_eq!(bytes(81559.0 * 1024.0 * 1024.0), "79.6G");
        assert_eq!(bytes(999.0 * 1024.0), "999K");
        assert!(bytes(1e15).len() <= 6);
    }

    /// Five GPUs and eight tenants fit an 80×24 terminal, every row whole.
    #[test]
    fn a_full_node_is_readable_at_80_by_24() {
        let gpus = (0..5)
            .map(|i| GpuRow {
                id: i.to_string(),
                state: "busy".into(),
                utilization: Some(0.5),
                memory_used: 8 << 30,
                memory_total: 80 << 30,
                power_watts: Some(350.0),
                tenants: vec!["acme".into(), "beta".into()],
            })
            .collect();
        let tenants = (0..8)
            .map(|i| TenantRow {
                tenant: format!("tenant-{i}"),
                gpu_share: Some(1.25),
                memory: 12 << 30,
                power_watts: Some(412.0),
                net_in: Some(1.5e6),
                net_out: Some(2e5),
                pcie: Some(3e9),
                quota: Some(("gpu_memory".into(), 1.2)),
            })
            .collect();
        let view = View {
            scope: "node gpu-a".into(),
            gpus,
            tenants,
        };
        let mut term = Terminal::new(TestBackend::new(80, 24)).unwrap();
        let status = Status {
            source: "http://127.0.0.1:9477",
            interval: std::time::Duration::from_secs(1),
            sort: SortKey::Gpu,
            reverse: false,
            error: None,
        };
        term.draw(|f| frame(f, &view, &status)).unwrap();
        let text = super::super::plain(term.backend().buffer());
        for i in 0..5 {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("{i} ")) && l.contains("350W")),
                "GPU {i} row:\n{text}"
            );
        }
        for i in 0..8 {
            let row = text
                .lines()
                .find(|l| l.starts_with(&format!("tenant-{i}")))
                .unwrap_or_else(|| panic!("tenant-{i} missing:\n{text}"));
            assert!(row.contains("OVER gpu_memory"), "{row}");
        }
        assert!(text.contains("q quit"), "{text}");
    }
}
