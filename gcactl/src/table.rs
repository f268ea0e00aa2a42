//! A small plain-text table renderer: a header row, then one line per row, every column padded
//! to its widest cell and separated by two spaces. No trailing whitespace, no borders, so the
//! output stays friendly to `grep`, `awk` and `column`.

/// How a column's cells are padded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

const GAP: &str = "  ";

#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| clean(h)).collect(),
            align: vec![Align::Left; headers.len()],
            rows: Vec::new(),
        }
    }

    /// Right-aligns column `col` (for numbers).
    pub fn right(mut self, col: usize) -> Self {
        if let Some(a) = self.align.get_mut(col) {
            *a = Align::Right;
        }
        self
    }

    /// Adds a row; missing cells are blank, extra cells are dropped.
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut row: Vec<String> = cells
            .into_iter()
            .take(self.headers.len())
            .map(|c| clean(c.as_ref()))
            .collect();
        row.resize(self.headers.len(), String::new());
        self.rows.push(row);
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str(GAP);
                }
                let pad = widths[i] - width(cell);
                let last = i + 1 == row.len();
                match self.align[i] {
                    Align::Left => {
                        line.push_str(cell);
                        if !last {
                            line.extend(std::iter::repeat_n(' ', pad));
                        }
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Renders `Key:  value` lines with the values aligned; `None` values are left out.
pub fn key_values(pairs: &[(&str, Option<String>)]) -> String {
    let present: Vec<(&str, &String)> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (*k, v)))
        .collect();
    let w = present.iter().map(|(k, _)| width(k) + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in present {
        let label = format!("{k}:");
        let line = format!("{label:<w$}{GAP}{}", clean(v));
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Display width of a cell (one column per character; no East Asian width tables).
fn width(s: &str) -> usize {
    s.chars().count()
}

/// Escapes control characters so one cell stays on one line and cannot move the cursor.
fn clean(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_columns_to_the_widest_cell_without_trailing_space() {
        let mut t = Table::new(&["NAME", "TYPE", "RESOURCE"]);
        t.row(["cts-a", "blcr", "node1.example.org"]);
        t.row(["a-much-longer-name", "dmtcp", "n2"]);
        assert_eq!(
            t.render(),
            "NAME                TYPE   RESOURCE\n\
             cts-a               blcr   node1.example.org\n\
             a-much-longer-name  dmtcp  n2\n"
        );
    }

    #[test]
    fn right_aligned_columns_pad_on_the_left() {
        let mut t = Table::new(&["SEQ", "ID"]).right(0);
        t.row(["1", "ckpt-1"]);
        t.row(["12", "ckpt-12"]);
        assert_eq!(t.render(), "SEQ  ID\n  1  ckpt-1\n 12  ckpt-12\n");
    }

    #[test]
    fn header_only_when_empty_and_blank_trailing_cells_are_trimmed() {
        let mut t = Table::new(&["A", "B"]);
        assert_eq!(t.render(), "A  B\n");
        t.row(["long value", ""]);
        assert_eq!(t.render(), "A           B\nlong value\n");
    }

    #[test]
    fn short_rows_are_filled_and_long_rows_cut() {
        let mut t = Table::new(&["A", "B"]);
        t.row(["x"]);
        t.row(["y", "z", "dropped"]);
        assert_eq!(t.render(), "A  B\nx\ny  z\n");
    }

    #[test]
    fn width_counts_characters_not_bytes() {
        let mut t = Table::new(&["NAME", "X"]);
        t.row(["héllo", "1"]);
        t.row(["ab", "2"]);
        assert_eq!(t.render(), "NAME   X\nhéllo  1\nab     2\n");
    }

    #[test]
    fn control_characters_are_escaped() {
        let mut t = Table::new(&["A", "B"]);
        t.row(["two\nlines", "tab\there"]);
        assert_eq!(t.render(), "A           B\ntwo\\nlines  tab\\there\n");
    }

    #[test]
    fn key_values_align_and_skip_missing_values() {
        let out = key_values(&[
            ("GID", Some("job-1".into())),
            ("Local ID", None),
            ("Latest checkpoint", Some("ck-3".into())),
        ]);
        assert_eq!(out, "GID:                job-1\nLatest checkpoint:  ck-3\n");
        assert_eq!(key_values(&[]), "");
    }
}
