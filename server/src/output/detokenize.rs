//! Incremental detokenization: the text of generated ids as they arrive, never half a character.
//!
//! Text is decoded incrementally and UTF-8 safely (the approach of TGI / vLLM's detokenizer): the
//! ids of the current segment are kept, the window from the last emitted point is decoded, and the
//! new suffix is emitted only when it does not end in U+FFFD (a byte-fallback character still
//! incomplete). At the end of a segment the rest is flushed as is. For valid UTF-8 output the
//! concatenation of a segment's deltas equals decoding its ids at once.

use std::sync::Arc;

use tokenizers::Tokenizer;

/// Incremental, UTF-8 safe decoding of one segment of ids (for the output parser, a run of
/// content or of reasoning); special tokens are skipped.
pub struct IncrementalDecoder {
    tokenizer: Arc<Tokenizer>,
    ids: Vec<u32>,
    /// Start of the decode window: text before it has been emitted and is not needed as context.
    prefix: usize,
    /// End of what has been emitted.
    read: usize,
}

impl IncrementalDecoder {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Appends ids to the segment.
    pub fn push(&mut self, ids: &[u32]) {
        self.ids.extend_from_slice(ids);
    }

    /// The text completed since the last call; empty while there is none, or while it would end
    /// in an incomplete character (held back until a later id completes it).
    pub fn next_text(&mut self) -> String {
        self.delta(false)
    }

    /// Ends the segment: the text not yet returned, as is (an incomplete character decodes to
    /// U+FFFD). The decoder then starts a new, empty segment.
    pub fn flush(&mut self) -> String {
        let text = self.delta(true);
        self.ids.clear();
        self.prefix = 0;
        self.read = 0;
        text
    }

    /// The new text since the last delta; unless `last`, text that ends in U+FFFD is held back.
    fn delta(&mut self, last: bool) -> String {
        if self.read >= self.ids.len() {
            return String::new();
        }
        let prefix_text = decode(&self.tokenizer, &self.ids[self.prefix..self.read], true);
        let new_text = decode(&self.tokenizer, &self.ids[self.prefix..], true);
        if !last && (new_text.len() <= prefix_text.len() || new_text.ends_with('\u{FFFD}')) {
            return String::new();
        }
        let delta = match new_text.strip_prefix(prefix_text.as_str()) {
            Some(rest) => rest.to_string(),
            // Only with invalid byte sequences: a later byte turned earlier text into U+FFFD.
            // Best effort: the new tokens on their own.
            None => decode(&self.tokenizer, &self.ids[self.read..], true),
        };
        self.prefix = self.read;
        self.read = self.ids.len();
        delta
    }
}

/// Decodes `ids` at once; a tokenizer error is logged and gives no text (output must go on).
pub fn decode(tok: &Tokenizer, ids: &[u32], skip_special_tokens: bool) -> String {
    tok.decode(ids, skip_special_tokens).unwrap_or_else(|e| {
        tracing::warn!("output parser: decoding {} ids failed: {e}", ids.len());
        String::new()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::fixture::tokenizer;

    fn encode(text: &str) -> Vec<u32> {
        tokenizer()
            .encode(text, false)
            .expect("encodes")
            .get_ids()
            .to_vec()
    }

    fn byte(b: u8) -> u32 {
        tokenizer()
            .token_to_id(&format!("<0x{b:02X}>"))
            .expect("byte-fallback token")
    }

    /// Pushes `ids` in chunks of `chunk`, returns every non-empty delta, the flush last.
    fn deltas(ids: &[u32], chunk: usize) -> Vec<String> {
        let mut dec = IncrementalDecoder::new(tokenizer());
        let mut out = Vec::new();
        for piece in ids.chunks(chunk) {
            dec.push(piece);
            out.push(dec.next_text());
        }
        out.push(dec.flush());
        out.retain(|t| !t.is_empty());
        out
    }

    #[test]
    fn byte_fallback_character_split_across_ids_is_held_back() {
        // 😀 is four byte-fallback ids: nothing until the fourth, then the whole character.
        let mut dec = IncrementalDecoder::new(tokenizer());
        dec.push(&encode("a"));
        assert_eq!(dec.next_text(), "a");
        for b in [0xF0, 0x9F, 0x98] {
            dec.push(&[byte(b)]);
            assert_eq!(dec.next_text(), "", "byte {b:#x}");
        }
        dec.push(&[byte(0x80)]);
        assert_eq!(dec.next_text(), "😀");
        dec.push(&encode("b"));
        assert_eq!(dec.next_text(), "b");
        assert_eq!(dec.flush(), "");
    }

    #[test]
    fn flush_gives_the_rest_and_starts_a_new_segment() {
        let mut dec = IncrementalDecoder::new(tokenizer());
        assert_eq!(dec.flush(), "");
        // An incomplete character is held back by next_text and flushed as U+FFFD.
        dec.push(&encode("x"));
        assert_eq!(dec.next_text(), "x");
        dec.push(&[byte(0xC3)]);
        assert_eq!(dec.next_text(), "");
        assert_eq!(dec.flush(), "\u{FFFD}");
        // The next segment does not see the old ids: the lone continuation byte is not joined to
        // the 0xC3 before it.
        dec.push(&[byte(0xA9)]);
        assert_eq!(dec.flush(), "\u{FFFD}");
        dec.push(&encode("Hello"));
        assert_eq!(dec.flush(), "Hello");
        assert_eq!(dec.next_text(), "");
    }

    #[test]
    fn invalid_bytes_do_not_panic() {
        // é as two byte ids, then a lone continuation byte: decoding the whole run gives three
        // U+FFFD; the deltas fall back to the new ids on their own and show `é�a`.
        let ids = [
            byte(0xC3),
            byte(0xA9),
            byte(0x80),
            tokenizer().token_to_id("a").unwrap(),
        ];
        assert_eq!(deltas(&ids, 1).concat(), "é\u{FFFD}a");
        let mut dec = IncrementalDecoder::new(tokenizer());
        dec.push(&[byte(0xFF)]);
        assert_eq!(dec.next_text(), "");
        assert_eq!(dec.flush(), "\u{FFFD}");
    }

    #[test]
    fn deltas_concatenate_to_one_decode() {
        let text = "Café: 日本 is nice 😀! Ünïcödé ✓ 𝄞 end\nThe weather in Paris is nice.";
        let ids = encode(text);
        assert_eq!(decode(&tokenizer(), &ids, true), text, "fixture round trip");
        for chunk in 1..=7 {
            let deltas = deltas(&ids, chunk);
            assert_eq!(deltas.concat(), text, "chunks of {chunk}");
            for d in &deltas {
                assert!(
                    !d.contains('\u{FFFD}'),
                    "chunks of {chunk}: half a character in {d:?}"
                );
            }
        }
        assert!(deltas(&ids, 1).len() > 10, "one id at a time streams");
    }

    #[test]
    fn special_tokens_are_skipped() {
        let tok = tokenizer();
        let mut ids = encode("Hi");
        ids.push(tok.token_to_id("<turn|>").unwrap());
        ids.extend(encode(" there"));
        assert_eq!(deltas(&ids, 1).concat(), "Hi there");
    }
}
