//! Plain aligned tables for operators' terminals.

use tenantry_core::text::escape_controls;

/// Renders rows under a header, columns padded to their widest cell. Control characters in a
/// cell (a line break or a terminal escape in a job's error text, say) are shown escaped, so
/// no cell can break the layout or drive the operator's terminal.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| escape_controls(cell)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_line_up() {
        let t = super::render(&["ID", "STATE"], &[vec!["shard-1".into(), "active".into()]]);
        assert_eq!(t, "ID       STATE\nshard-1  active\n");
    }

    #[test]
    fn control_characters_are_shown_escaped() {
        let t = super::render(&["A", "B"], &[vec!["x\ny".into(), "\u{1b}[2Jé".into()]]);
        assert_eq!(t, "A     B\nx\\ny  \\u{1b}[2Jé\n");
    }
}
