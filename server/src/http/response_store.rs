//! Stored responses (`store`, default true): finished Responses API answers kept in memory for
//! `GET /v1/responses/{id}`, `DELETE /v1/responses/{id}` and `previous_response_id`. Bounded by
//! the approximate bytes of what is kept (the conversation and the response; the oldest go first
//! when a new one does not fit) and by age (`--responses-store-ttl`). In memory only: a restart
//! forgets them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::openai::protocol::{Content, ContentPart, ImageUrl, Message, ResponseObject};

/// A finished response and what a continuation of it needs.
#[derive(Debug)]
pub struct StoredResponse {
    /// As the POST answered it (for a stream, the object of its last event).
    pub response: ResponseObject,
    /// The messages it ran on, without its `instructions` (a continuation does not inherit
    /// them); its output is in `response.output`.
    pub conversation: Vec<Message>,
}

pub struct ResponseStore {
    max_bytes: usize,
    ttl: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Entry>,
    /// Insertion number to id: oldest first, the order of both eviction and expiry (every entry
    /// lives as long).
    order: BTreeMap<u64, String>,
    next: u64,
    bytes: usize,
}

struct Entry {
    stored: Arc<StoredResponse>,
    bytes: usize,
    at: Instant,
    seq: u64,
}

impl Inner {
    fn remove(&mut self, id: &str) -> Option<Entry> {
        let e = self.by_id.remove(id)?;
        self.order.remove(&e.seq);
        self.bytes -= e.bytes;
        Some(e)
    }

    fn pop_oldest(&mut self) -> Option<Entry> {
        let (_, id) = self.order.first_key_value()?;
        let id = id.clone();
        self.remove(&id)
    }

    /// Drops the entries older than `ttl`, oldest first.
    fn expire(&mut self, now: Instant, ttl: Duration) {
        while let Some((_, id)) = self.order.first_key_value() {
            match self.by_id.get(id) {
                Some(e) if now.saturating_duration_since(e.at) < ttl => break,
                _ => {
                    self.pop_oldest();
                }
            }
        }
    }
}

impl ResponseStore {
    /// A store of at most `max_bytes` (0: nothing is kept) whose entries live `ttl`.
    pub fn new(max_bytes: usize, ttl: Duration) -> Self {
        ResponseStore {
            max_bytes,
            ttl,
            inner: Mutex::default(),
        }
    }

    /// The lock; nothing panics while holding it, and the maps stay consistent if something did.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `stored` under its response's id, evicting the oldest entries until it fits. One
    /// larger than the whole budget is not kept (false).
    pub fn insert(&self, stored: StoredResponse) -> bool {
        self.insert_at(Instant::now(), stored)
    }

    fn insert_at(&self, now: Instant, stored: StoredResponse) -> bool {
        // Measured before taking the lock: serializing a large response takes a while.
        let bytes = approx_bytes(&stored);
        if bytes > self.max_bytes {
            return false;
        }
        let id = stored.response.id.clone();
        let mut inner = self.lock();
        inner.expire(now, self.ttl);
        inner.remove(&id);
        while inner.bytes + bytes > self.max_bytes && inner.pop_oldest().is_some() {}
        let seq = inner.next;
        inner.next += 1;
        inner.order.insert(seq, id.clone());
        inner.bytes += bytes;
        let stored = Arc::new(stored);
        inner.by_id.insert(
            id,
            Entry {
                stored,
                bytes,
                at: now,
                seq,
            },
        );
        true
    }

    /// The response stored under `id`, unless it was deleted, evicted or has expired.
    pub fn get(&self, id: &str) -> Option<Arc<StoredResponse>> {
        self.get_at(Instant::now(), id)
    }

    fn get_at(&self, now: Instant, id: &str) -> Option<Arc<StoredResponse>> {
        let mut inner = self.lock();
        inner.expire(now, self.ttl);
        inner.by_id.get(id).map(|e| e.stored.clone())
    }

    /// Deletes `id`; false when it was not stored.
    pub fn delete(&self, id: &str) -> bool {
        let mut inner = self.lock();
        inner.expire(Instant::now(), self.ttl);
        inner.remove(id).is_some()
    }
}

/// Per message and per content part: what the strings do not count (enum tags, vectors).
const OVERHEAD: usize = 64;

/// The bytes a stored response holds, approximately: its JSON, and every string of its
/// conversation (text, image URLs, call arguments).
fn approx_bytes(s: &StoredResponse) -> usize {
    let response = serde_json::to_vec(&s.response).map_or(0, |v| v.len());
    response + s.conversation.iter().map(message_bytes).sum::<usize>()
}

fn message_bytes(m: &Message) -> usize {
    OVERHEAD
        + match m {
            Message::System { content }
            | Message::Developer { content }
            | Message::User { content } => content_bytes(content),
            Message::Assistant {
                content,
                reasoning_content,
                tool_calls,
            } => {
                content.as_ref().map_or(0, content_bytes)
                    + opt(reasoning_content)
                    + tool_calls
                        .iter()
                        .map(|c| {
                            OVERHEAD
                                + opt(&c.id)
                                + c.function.name.len()
                                + value_bytes(&c.function.arguments)
                        })
                        .sum::<usize>()
            }
            Message::Tool {
                content,
                tool_call_id,
                name,
            } => content_bytes(content) + opt(tool_call_id) + opt(name),
        }
}

fn content_bytes(c: &Content) -> usize {
    match c {
        Content::Text(t) => t.len(),
        Content::Parts(parts) => parts.iter().map(|p| OVERHEAD + part_bytes(p)).sum(),
    }
}

fn part_bytes(p: &ContentPart) -> usize {
    match p {
        ContentPart::Text { text }
        | ContentPart::InputText { text }
        | ContentPart::OutputText { text } => text.len(),
        ContentPart::ImageUrl { image_url } => image_url_bytes(image_url),
        ContentPart::InputImage { image_url, file_id } => opt(image_url) + opt(file_id),
        ContentPart::Image {
            url,
            image,
            image_url,
        } => opt(url) + opt(image) + image_url.as_ref().map_or(0, image_url_bytes),
    }
}

fn image_url_bytes(u: &ImageUrl) -> usize {
    match u {
        ImageUrl::Url(url) => url.len(),
        ImageUrl::Object { url, detail } => opt(url) + opt(detail),
    }
}

fn opt(s: &Option<String>) -> usize {
    s.as_ref().map_or(0, String::len)
}

fn value_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        other => other.to_string().len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::protocol::{ResponsesToolChoice, ToolChoiceMode};

    fn stored(id: &str, text_bytes: usize) -> StoredResponse {
        StoredResponse {
            response: ResponseObject {
                id: id.into(),
                object: "response".into(),
                created_at: 0,
                status: "completed".into(),
                model: "tiny".into(),
                output: vec![],
                usage: None,
                incomplete_details: None,
                error: None,
                instructions: None,
                max_output_tokens: None,
                parallel_tool_calls: true,
                tools: vec![],
                tool_choice: ResponsesToolChoice::Mode(ToolChoiceMode::Auto),
                temperature: None,
                top_p: None,
                store: true,
                previous_response_id: None,
            },
            conversation: vec![Message::User {
                content: Content::Text("x".repeat(text_bytes)),
            }],
        }
    }

    /// The bytes of a response with a one-letter id and `text_bytes` of conversation text.
    fn size(text_bytes: usize) -> usize {
        approx_bytes(&stored("z", text_bytes))
    }

    #[test]
    fn the_conversation_counts_toward_the_budget() {
        let small = size(0);
        assert_eq!(size(30 << 20), small + (30 << 20));
        // Images are counted by their URL (a data: URL holds the whole image).
        let image = Message::User {
            content: Content::Parts(vec![ContentPart::ImageUrl {
                image_url: ImageUrl::Url("d".repeat(1000)),
            }]),
        };
        assert!(message_bytes(&image) >= 1000);
    }

    #[test]
    fn the_oldest_are_evicted_first_and_a_response_over_the_budget_is_not_kept() {
        let one = size(1000);
        let store = ResponseStore::new(3 * one, Duration::from_secs(60));
        for id in ["a", "b", "c"] {
            assert!(store.insert(stored(id, 1000)));
        }
        assert!(["a", "b", "c"].iter().all(|id| store.get(id).is_some()));
        // A fourth pushes out the oldest only.
        assert!(store.insert(stored("d", 1000)));
        assert!(store.get("a").is_none());
        assert!(["b", "c", "d"].iter().all(|id| store.get(id).is_some()));
        // One that needs two places pushes out two.
        assert!(store.insert(stored("e", 1000 + one)));
        assert!(store.get("b").is_none() && store.get("c").is_none());
        assert!(store.get("d").is_some() && store.get("e").is_some());
        // Larger than the whole budget: not kept, and nothing is evicted for it.
        assert!(!store.insert(stored("f", 3 * one)));
        assert!(store.get("f").is_none());
        assert!(store.get("d").is_some() && store.get("e").is_some());
        assert!(store.lock().bytes <= 3 * one);
    }

    #[test]
    fn delete_frees_its_bytes() {
        let one = size(100);
        let store = ResponseStore::new(2 * one, Duration::from_secs(60));
        store.insert(stored("a", 100));
        store.insert(stored("b", 100));
        assert!(store.delete("a"));
        assert!(!store.delete("a"));
        assert_eq!(store.lock().bytes, one);
        // The freed room takes a new one without evicting "b".
        store.insert(stored("c", 100));
        assert!(store.get("b").is_some() && store.get("c").is_some());
    }

    #[test]
    fn a_zero_budget_keeps_nothing() {
        let store = ResponseStore::new(0, Duration::from_secs(60));
        assert!(!store.insert(stored("a", 0)));
        assert!(store.get("a").is_none());
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let store = ResponseStore::new(1 << 20, Duration::from_secs(10));
        let t0 = Instant::now();
        store.insert_at(t0, stored("a", 10));
        store.insert_at(t0 + Duration::from_secs(5), stored("b", 10));
        assert!(store.get_at(t0 + Duration::from_secs(9), "a").is_some());
        assert!(store.get_at(t0 + Duration::from_secs(10), "a").is_none());
        assert!(store.get_at(t0 + Duration::from_secs(10), "b").is_some());
        assert!(store.get_at(t0 + Duration::from_secs(15), "b").is_none());
        let inner = store.lock();
        assert!(inner.by_id.is_empty() && inner.order.is_empty() && inner.bytes == 0);
    }
}
