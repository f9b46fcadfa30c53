//! Stop strings over streamed text: the text is passed on as it comes, except a tail that
//! could be the start of a stop string, which is held back until the next piece decides it.

/// Streamed text cut at the first occurrence of any of its stop strings.
#[derive(Debug, Default)]
pub struct StopFilter {
    stops: Vec<String>,
    held: String,
}

impl StopFilter {
    /// A filter for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    /// Adds `piece`; returns the text that is now final, and whether a stop string was found
    /// (then the text ends before it and nothing more comes).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // The longest tail of the held text that a stop string starts with stays held.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| s.char_indices().skip(1).map(|(i, _)| &s[..i]).take_while(|p| p.len() <= self.held.len()))
            .filter(|prefix| self.held.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.replace_range(..cut, "");
        (out, false)
    }

    /// The held text, once no more pieces will come.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, String, bool) {
        let mut f = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            let (text, stopped) = f.push(p);
            out.push(text);
            if stopped {
                return (out, String::new(), true);
            }
        }
        (out, f.finish(), false)
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_held_back_then_cut() {
        let (out, rest, stopped) = run(&["</s>", "User:"], &["Hello wor", "ld! Us", "er: more"]);
        assert_eq!(out, ["Hello wor", "ld! ", ""]);
        assert!(stopped && rest.is_empty());
    }

    #[test]
    fn a_held_tail_that_does_not_become_a_stop_string_is_released() {
        let (out, rest, stopped) = run(&["User:"], &["a Us", "ually", " b", " Us"]);
        assert_eq!(out, ["a ", "Usually", " b", " "]);
        assert_eq!((rest.as_str(), stopped), ("Us", false));
    }

    #[test]
    fn the_earliest_stop_string_wins_and_multibyte_text_is_cut_on_characters() {
        let (out, _, stopped) = run(&["é!", "b"], &["aé", "!b"]);
        assert_eq!(out, ["a", ""]);
        assert!(stopped);
        let (out, rest, stopped) = run(&[], &["plain"]);
        assert_eq!((out, rest, stopped), (vec!["plain".to_string()], String::new(), false));
    }
}
