//! Token files: `.bin` (raw little-endian uint16, nanoGPT's format), `.u32` (raw little-endian
//! uint32), and text (`.txt`, or `.jsonl` with a `text` field per line) tokenized with a
//! `tokenizer.json`.

use std::io::{BufRead, BufReader};
use std::path::Path;

use tokenizers::Tokenizer;

use crate::{Error, Result};

/// The on-disk formats, chosen by file extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenFormat {
    U16,
    U32,
    Text,
    Jsonl,
}

impl TokenFormat {
    pub fn of(path: &Path) -> Result<TokenFormat> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("bin") => Ok(TokenFormat::U16),
            Some("u32") => Ok(TokenFormat::U32),
            Some("txt") => Ok(TokenFormat::Text),
            Some("jsonl") => Ok(TokenFormat::Jsonl),
            _ => Err(Error::Data {
                path: path.into(),
                message: "unknown data format: use .bin (uint16 tokens), .u32 (uint32 tokens), .txt or .jsonl".into(),
            }),
        }
    }
}

/// A token stream: tokenized text held in memory, or a token file mapped from disk. A mapped file
/// is read through the page cache as windows are used, shared by every rank on the machine and
/// never copied whole (OpenWebText's 17 GB `train.bin` would otherwise take three times its size
/// in every rank while loading).
pub enum Tokens {
    Owned(Vec<u32>),
    Mapped { map: memmap2::Mmap, width: usize },
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokens::Owned(v) => write!(f, "Tokens::Owned({} tokens)", v.len()),
            Tokens::Mapped { map, width } => write!(f, "Tokens::Mapped({} tokens of {width} bytes)", map.len() / width),
        }
    }
}

impl From<Vec<u32>> for Tokens {
    fn from(v: Vec<u32>) -> Self {
        Tokens::Owned(v)
    }
}

impl Tokens {
    pub fn len(&self) -> usize {
        match self {
            Tokens::Owned(v) => v.len(),
            Tokens::Mapped { map, width } => map.len() / width,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends tokens `range` to `out`.
    pub fn extend_window(&self, range: std::ops::Range<usize>, out: &mut Vec<u32>) {
        match self {
            Tokens::Owned(v) => out.extend_from_slice(&v[range]),
            Tokens::Mapped { map, width: 2 } => {
                out.extend(map[2 * range.start..2 * range.end].chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32))
            }
            Tokens::Mapped { map, .. } => {
                out.extend(map[4 * range.start..4 * range.end].chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            }
        }
    }

    /// Every token, in order.
    pub fn to_vec(&self) -> Vec<u32> {
        let mut v = Vec::with_capacity(self.len());
        self.extend_window(0..self.len(), &mut v);
        v
    }

    /// The position and value of the first token for which `bad` holds, read a block at a time.
    fn find(&self, bad: impl Fn(u32) -> bool) -> Option<(usize, u32)> {
        let mut block = Vec::with_capacity(1 << 20);
        let mut at = 0;
        while at < self.len() {
            let end = (at + (1 << 20)).min(self.len());
            block.clear();
            self.extend_window(at..end, &mut block);
            if let Some(i) = block.iter().position(|t| bad(*t)) {
                return Some((at + i, block[i]));
            }
            at = end;
        }
        None
    }
}

/// Refuses tokens the model cannot embed, naming the file and the first offending position.
pub fn check_vocab(tokens: &Tokens, vocab: usize, path: &Path) -> Result<()> {
    match tokens.find(|t| t as usize >= vocab) {
        // The value itself is not quoted: it is two or four bytes of a file the daemon may read
        // for a user who could not (see docs/security.md).
        Some((i, _)) => Err(Error::Data {
            path: path.into(),
            message: format!("the token at position {i} is outside the model's vocabulary of {vocab} (is this the model's token file?)"),
        }),
        None => Ok(()),
    }
}

pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if !path.is_file() {
        return Err(Error::Tokenizer {
            path: path.into(),
            message: "not found (text data needs a tokenizer.json: set data.tokenizer)".into(),
        });
    }
    // The library's message may quote the file (an unknown variant's name): only where it failed
    // is kept.
    Tokenizer::from_file(path).map_err(|e| {
        let text = e.to_string();
        let at = text.rfind(" at line ").map_or(String::new(), |i| format!(" ({})", text[i + 1..].trim()));
        Error::Tokenizer { path: path.into(), message: format!("not a tokenizer.json the tokenizers library can read{at}") }
    })
}

/// Loads the tokens of `path`: a token file is mapped, text is tokenized with `tokenizer`
/// (required for text formats).
pub fn load_tokens(path: &Path, tokenizer: Option<&Path>) -> Result<Tokens> {
    let format = TokenFormat::of(path)?;
    match format {
        TokenFormat::U16 | TokenFormat::U32 => {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
            let width = if format == TokenFormat::U16 { 2 } else { 4 };
            if len % width as u64 != 0 {
                return Err(Error::Data {
                    path: path.into(),
                    message: format!("{len} bytes is not a whole number of {width}-byte tokens"),
                });
            }
            if len == 0 {
                return Ok(Tokens::Owned(Vec::new()));
            }
            // SAFETY: the map is read-only, and the file is not expected to change under a run
            // (a token file is written once, before training); one truncated meanwhile would
            // fault the process (SIGBUS) rather than be read wrong silently.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            Ok(Tokens::Mapped { map, width })
        }
        TokenFormat::Text | TokenFormat::Jsonl => {
            let tok_path = tokenizer
                .ok_or_else(|| Error::Data { path: path.into(), message: "text data needs a tokenizer: set data.tokenizer".into() })?;
            let tok = load_tokenizer(tok_path)?;
            Ok(Tokens::Owned(encode_text_file(path, &tok, |_| {})?))
        }
    }
}

/// Tokenizes a `.txt` file (as one document) or a `.jsonl` file (one document per line's `text`,
/// separated by the tokenizer's end-of-document token when it has one), reporting bytes read.
pub fn encode_text_file(path: &Path, tok: &Tokenizer, mut progress: impl FnMut(u64)) -> Result<Vec<u32>> {
    let format = TokenFormat::of(path)?;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    // The end-of-document token by the names the common tokenizers give it: GPT-2's, LLaMA-3's,
    // and the SentencePiece `</s>` of LLaMA-2 and Mistral.
    let eot = ["<|endoftext|>", "<|end_of_text|>", "</s>"].iter().find_map(|t| tok.token_to_id(t));
    if eot.is_none() && format == TokenFormat::Jsonl {
        tracing::warn!(data = %path.display(), "the tokenizer has no end-of-document token: documents are joined without a separator");
    }
    let encode = |text: &str| -> Result<Vec<u32>> {
        tok.encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer { path: path.into(), message: e.to_string() })
    };
    let mut out = Vec::new();
    match format {
        TokenFormat::Text => {
            // Pieces of about 64 KiB keep memory flat and the progress bar moving. A piece is cut
            // only where the tokenizer gives the same tokens cut or whole (see `safe_cut`), so
            // the file's tokens are those of the whole text.
            const PIECE: usize = 1 << 16;
            let mut piece = String::new();
            let mut line = String::new();
            // Where to look for a cut next: after a piece with no safe place, 4 KiB later.
            let mut next_try = PIECE;
            let mut forced = false;
            loop {
                line.clear();
                let n = reader.read_line(&mut line).map_err(|e| Error::io(path, e))?;
                piece.push_str(&line);
                progress(n as u64);
                if n == 0 {
                    out.extend(encode(&piece)?);
                    break;
                }
                if piece.len() > next_try {
                    // Past 4 MiB without a safe place, memory no longer stays flat: look further
                    // back, and failing that cut at the last line break (one token may change at
                    // the cut, as it did when pieces were cut at every blank line).
                    let wide = piece.len() > 64 * PIECE;
                    let cut = match safe_cut(&piece, &encode, wide)? {
                        Some(cut) => Some(cut),
                        None if wide => {
                            if !forced {
                                forced = true;
                                tracing::warn!(data = %path.display(), "no place to cut the text where the tokenizer gives the same tokens cut or whole within 4 MiB: cutting at a line break (a token may differ there)");
                            }
                            piece.trim_end_matches('\n').rfind('\n').map(|i| i + 1).filter(|&i| i > 0)
                        }
                        None => None,
                    };
                    match cut {
                        Some(cut) => {
                            out.extend(encode(&piece[..cut])?);
                            piece.drain(..cut);
                            next_try = PIECE;
                        }
                        None => next_try = piece.len() + (1 << 12),
                    }
                }
            }
        }
        TokenFormat::Jsonl => {
            let mut line = String::new();
            let mut lineno = 0;
            loop {
                line.clear();
                let n = reader.read_line(&mut line).map_err(|e| Error::io(path, e))?;
                if n == 0 {
                    break;
                }
                lineno += 1;
                progress(n as u64);
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| Error::Data {
                    path: path.into(),
                    message: format!("line {lineno}: {}", crate::models::config::json_error(&e)),
                })?;
                let text = v
                    .get("text")
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| Error::Data { path: path.into(), message: format!("line {lineno}: no string field `text`") })?;
                out.extend(encode(text)?);
                if let Some(e) = eot {
                    out.push(e);
                }
            }
        }
        TokenFormat::U16 | TokenFormat::U32 => {
            return Err(Error::Data { path: path.into(), message: "already a token file".into() });
        }
    }
    Ok(out)
}

/// A place near the end of `text` where it can be cut into two pieces whose tokens, encoded
/// apart, are those of the whole: before one of the last spaces or line breaks, where the
/// tokenizer's pre-tokenizer splits anyway. Which of those places is safe depends on the
/// tokenizer (GPT-2 keeps a blank line's two line breaks apart before a word, LLaMA-3 joins
/// them; SentencePiece marks a piece's first word), so each candidate is checked with the
/// tokenizer itself on the text around it. `None` if none of them is safe: the piece grows.
///
/// `wide`: look at up to 64 line breaks in the last 64 KiB too (a text whose lines all end where
/// the tokenizer joins across them, say).
fn safe_cut(text: &str, encode: &impl Fn(&str) -> Result<Vec<u32>>, wide: bool) -> Result<Option<usize>> {
    /// Bytes of context on the left of a candidate: more than any pre-tokenizer looks back.
    const CONTEXT: usize = 256;
    let near = text.char_indices().rev().take(512).filter(|(_, c)| *c == ' ' || *c == '\n').map(|(i, _)| i).take(8);
    let far = text.char_indices().rev().take(if wide { 1 << 16 } else { 0 }).filter(|(_, c)| *c == '\n').map(|(i, _)| i).take(64);
    let candidates = near.chain(far);
    for cut in candidates.filter(|&i| i > CONTEXT) {
        let mut start = cut - CONTEXT;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        let (left, right) = (&text[start..cut], &text[cut..]);
        let mut apart = encode(left)?;
        apart.extend(encode(right)?);
        if apart == encode(&text[start..])? {
            return Ok(Some(cut));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error names the position, not the value: two bytes of a file the daemon may read for a
    /// user who could not.
    #[test]
    fn a_token_outside_the_vocabulary_is_named_by_position_not_value() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.bin");
        std::fs::write(&p, [1u8, 0, b'h', b'u']).unwrap();
        let err = check_vocab(&load_tokens(&p, None).unwrap(), 512, &p).unwrap_err().to_string();
        assert!(err.contains("the token at position 1 is outside the model's vocabulary of 512"), "{err}");
        assert!(!err.contains(&u16::from_le_bytes(*b"hu").to_string()), "{err}");
    }

    #[test]
    fn binary_formats_round_trip_and_odd_lengths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p16 = dir.path().join("a.bin");
        std::fs::write(&p16, [1u8, 0, 255, 255, 7, 1]).unwrap();
        assert_eq!(load_tokens(&p16, None).unwrap().to_vec(), vec![1, 65535, 263]);
        let p32 = dir.path().join("a.u32");
        std::fs::write(&p32, [1u8, 0, 1, 0, 2, 0, 0, 0]).unwrap();
        assert_eq!(load_tokens(&p32, None).unwrap().to_vec(), vec![65537, 2]);
        let mut w = vec![9];
        load_tokens(&p32, None).unwrap().extend_window(1..2, &mut w);
        assert_eq!(w, [9, 2]);
        std::fs::write(&p16, []).unwrap();
        assert!(load_tokens(&p16, None).unwrap().is_empty());
        std::fs::write(&p32, [1u8, 0, 1]).unwrap();
        assert!(load_tokens(&p32, None).unwrap_err().to_string().contains("a.u32"));
        let txt = dir.path().join("a.txt");
        std::fs::write(&txt, "hello").unwrap();
        assert!(load_tokens(&txt, None).unwrap_err().to_string().contains("tokenizer"));
    }

    /// A text of many 64 KiB pieces tokenizes as one whole, with a byte-level BPE that, like
    /// GPT-2's, merges two line breaks: at the end of a piece a blank line's breaks become one
    /// token, before a word two (cut at blank lines, this text lost 2 tokens).
    #[test]
    fn a_long_text_read_in_pieces_gives_the_tokens_of_the_whole() {
        let dir = tempfile::tempdir().unwrap();
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/tokenizer.json");
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(example).unwrap()).unwrap();
        let vocab = json["model"]["vocab"].as_object_mut().unwrap();
        let id = vocab.values().filter_map(|v| v.as_u64()).max().unwrap() + 1;
        vocab.insert("ĊĊ".into(), id.into());
        json["model"]["merges"].as_array_mut().unwrap().insert(0, serde_json::json!(["Ċ", "Ċ"]));
        let tok_path = dir.path().join("tokenizer.json");
        std::fs::write(&tok_path, json.to_string()).unwrap();
        let tok = load_tokenizer(&tok_path).unwrap();
        assert_eq!(tok.encode_fast("a\n\n", false).unwrap().get_ids().len(), 2, "the merge applies");
        let mut text = String::new();
        let mut s = 7u64;
        let words = ["the", "model", "learns", "a", "story", "of", "tokens.", "And", "then,", "  it", "ends!"];
        while text.len() < 400_000 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            text.push_str(words[(s >> 33) as usize % words.len()]);
            text.push_str(match (s >> 20) % 13 {
                0 => "\n\n",
                1 => "\n",
                2 => " \n\n\n",
                _ => " ",
            });
        }
        let path = dir.path().join("long.txt");
        std::fs::write(&path, &text).unwrap();
        let whole = tok.encode_fast(text.as_str(), false).unwrap().get_ids().to_vec();
        let mut read = 0;
        let got = encode_text_file(&path, &tok, |n| read += n).unwrap();
        assert_eq!(read, text.len() as u64);
        assert_eq!(got.len(), whole.len());
        assert!(got == whole, "first difference at token {:?}", got.iter().zip(&whole).position(|(a, b)| a != b));
    }

    /// A LLaMA-style tokenizer ends documents with `</s>`, not GPT-2's `<|endoftext|>`: JSON-lines
    /// documents are still separated.
    #[test]
    fn jsonl_documents_end_with_the_tokenizers_own_end_token() {
        let dir = tempfile::tempdir().unwrap();
        let tok = dir.path().join("tokenizer.json");
        std::fs::write(
            &tok,
            r#"{"version":"1.0","truncation":null,"padding":null,
                "added_tokens":[{"id":2,"content":"</s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
                "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
                "model":{"type":"WordLevel","vocab":{"a":0,"b":1,"</s>":2,"[UNK]":3},"unk_token":"[UNK]"}}"#,
        )
        .unwrap();
        let data = dir.path().join("docs.jsonl");
        std::fs::write(&data, "{\"text\": \"a b\"}\n{\"text\": \"b a\"}\n").unwrap();
        assert_eq!(load_tokens(&data, Some(&tok)).unwrap().to_vec(), vec![0, 1, 2, 1, 0, 2]);
    }
}
