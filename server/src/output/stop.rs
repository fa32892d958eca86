//! Stop strings over streamed text: text that may be the start of a stop string is held back
//! until it is known not to be; at a hit, the text before the stop string is let out and the
//! stop string and everything after it are dropped (OpenAI's `stop`, which is not returned).

pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// Returns (text safe to emit, stop hit).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return (std::mem::take(&mut self.pending), false);
        }
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.pending.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// What is held back, at the end of generation (no stop string can complete any more).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` cut at every char boundary into pieces of one char; returns (emitted, hit).
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (o, hit) = m.push(p);
            out.push_str(&o);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_strings_split_across_pieces() {
        let text = "Hello, wörld. The END is near";
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(&["END"], &pieces), ("Hello, wörld. The ".into(), true));
        assert_eq!(run(&["ö"], &pieces), ("Hello, w".into(), true));
        // Earliest of several stops wins; a partial match at the end is flushed.
        assert_eq!(
            run(&["near", "The"], &pieces),
            ("Hello, wörld. ".into(), true)
        );
        assert_eq!(run(&["nearby"], &pieces), (text.into(), false));
        assert_eq!(run(&[""], &pieces), (text.into(), false));
        assert_eq!(run(&[], &[text]), (text.into(), false));
    }

    #[test]
    fn text_that_may_start_a_stop_is_held_back() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("abc ST"), ("abc ".into(), false));
        assert_eq!(m.push("O"), (String::new(), false));
        assert_eq!(m.push("x"), ("STOx".into(), false));
    }
}
