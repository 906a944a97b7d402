//! Step timings: what each jail step cost, for `--timings` and `cella-bench jailer`.

use std::time::Instant;

/// Durations of named steps, in the order they ran.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub steps: Vec<(String, f64)>,
}

impl Timings {
    /// Records a step that started at `start` and ends now.
    pub fn record(&mut self, step: &str, start: Instant) {
        self.steps.push((step.to_owned(), start.elapsed().as_secs_f64() * 1e3));
    }

    /// Adds a step of a known length in milliseconds.
    pub fn push(&mut self, step: &str, ms: f64) {
        self.steps.push((step.to_owned(), ms));
    }

    /// One `T <step> <ms>` line per step (the child's report to the supervisor).
    pub fn encode(&self) -> String {
        self.steps.iter().map(|(s, ms)| format!("T {s} {ms:.6}\n")).collect()
    }

    /// Reads back what [`Timings::encode`] wrote (other lines are skipped).
    pub fn decode(text: &str) -> Self {
        let steps = text
            .lines()
            .filter_map(|l| {
                let mut parts = l.strip_prefix("T ")?.split(' ');
                Some((parts.next()?.to_owned(), parts.next()?.parse().ok()?))
            })
            .collect();
        Timings { steps }
    }

    /// `step=ms` pairs on one line, for `--timings`.
    pub fn line(&self) -> String {
        self.steps.iter().map(|(s, ms)| format!("{s}={ms:.3}")).collect::<Vec<_>>().join(" ")
    }

    /// Parses what [`Timings::line`] wrote.
    pub fn parse_line(line: &str) -> Self {
        let steps = line
            .split_whitespace()
            .filter_map(|pair| {
                let (s, ms) = pair.split_once('=')?;
                Some((s.to_owned(), ms.parse().ok()?))
            })
            .collect();
        Timings { steps }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut t = Timings::default();
        t.push("mounts", 0.25);
        t.push("landlock", 0.125);
        assert_eq!(Timings::decode(&t.encode()).steps, t.steps);
        assert_eq!(Timings::parse_line(&t.line()).steps, t.steps);
    }
}
