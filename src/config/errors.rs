//! Config errors, each located at its line and column, shown with the line.

use std::fmt;
use std::ops::Range;

/// Every problem found in a config file.
#[derive(Debug)]
pub struct ConfigErrors {
    pub(crate) origin: String,
    pub(crate) src: String,
    pub(crate) errors: Vec<(Range<usize>, String)>,
}

impl ConfigErrors {
    /// `(line, column, message)` for each error, 1-based.
    pub fn located(&self) -> Vec<(usize, usize, &str)> {
        self.errors
            .iter()
            .map(|(span, msg)| {
                let (l, c) = line_col(&self.src, span.start);
                (l, c, msg.as_str())
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.errors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (line, col, msg)) in self.located().into_iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{line}:{col}: {msg}", self.origin)?;
            if let Some(text) = self.src.lines().nth(line.saturating_sub(1)) {
                write!(f, "\n    {line:>4} | {text}\n         | {:>col$}", "^")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
