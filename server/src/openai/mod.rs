//! The OpenAI API as data: the wire types ([`protocol`]), the error object ([`error`]), the
//! checks that turn a request into the one validated form the server runs ([`request`]), and
//! the conversion of chat messages to what a chat template reads ([`messages`]); the legacy
//! completions API's types and checks on their own ([`completions`]). No HTTP here beyond the
//! error's status code.

pub mod completions;
pub mod error;
pub mod messages;
pub mod protocol;
pub mod request;
