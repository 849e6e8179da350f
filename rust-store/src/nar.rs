//! The Nix archive format, NAR (libutil/archive.cc).
//!
//! A NAR is a sequence of strings, each a little-endian u64 length, the bytes
//! and zero padding to a multiple of 8; a regular file's contents are one such
//! string. The grammar:
//!
//! ```text
//! nar       = "nix-archive-1" node
//! node      = "(" "type" ( regular | symlink | directory ) ")"
//! regular   = "regular" [ "executable" "" ] "contents" <contents>
//! symlink   = "symlink" "target" <target>
//! directory = "directory" { "entry" "(" "name" <name> "node" node ")" }
//! ```
//!
//! Directory entries are sorted by name, byte-wise, without duplicates.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::mem;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt};

const MAGIC: &[u8] = b"nix-archive-1";

/// The longest keyword ("nix-archive-1" itself).
const MAX_KEYWORD_LEN: usize = 16;

/// The longest file name or symlink target accepted: PATH_MAX on Linux.
const MAX_STRING_LEN: usize = 4096;

/// The most directories a NAR may nest: PATH_MAX / 2, as deep as a Linux
/// path can go.
const MAX_DEPTH: usize = 2048;

/// A file system object held in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NarEntry {
    Regular { executable: bool, contents: Vec<u8> },
    Symlink { target: String },
    Directory(BTreeMap<String, NarEntry>),
}

/// Appends `s` as a NAR string: length, bytes, padding.
fn put(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.extend_from_slice(padding(s.len() as u64));
}

/// The zero bytes that pad a string of `len` bytes to a multiple of 8.
fn padding(len: u64) -> &'static [u8] {
    &[0; 8][..(len.wrapping_neg() % 8) as usize]
}

/// Appends the tokens of a regular file up to its contents.
fn put_regular_header(out: &mut Vec<u8>, executable: bool) {
    for token in [b"(" as &[u8], b"type", b"regular"] {
        put(out, token);
    }
    if executable {
        put(out, b"executable");
        put(out, b"");
    }
    put(out, b"contents");
}

/// The NAR of `entry`. Directory names are written as given: an entry named
/// "", ".", ".." or containing '/' or NUL makes a NAR no reader accepts.
pub fn write_nar(entry: &NarEntry) -> Vec<u8> {
    let mut out = Vec::new();
    put(&mut out, MAGIC);
    write_node(&mut out, entry);
    out
}

fn write_node(out: &mut Vec<u8>, entry: &NarEntry) {
    match entry {
        NarEntry::Regular { executable, contents } => {
            put_regular_header(out, *executable);
            put(out, contents);
        }
        NarEntry::Symlink { target } => {
            for token in [b"(" as &[u8], b"type", b"symlink", b"target", target.as_bytes()] {
                put(out, token);
            }
        }
        NarEntry::Directory(entries) => {
            for token in [b"(" as &[u8], b"type", b"directory"] {
                put(out, token);
            }
            for (name, entry) in entries {
                for token in [b"entry" as &[u8], b"(", b"name", name.as_bytes(), b"node"] {
                    put(out, token);
                }
                write_node(out, entry);
                put(out, b")");
            }
        }
    }
    put(out, b")");
}

/// The NAR of a non-executable regular file with these contents (Nix's `dumpString`).
pub fn dump_flat_file_contents(contents: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(contents.len() + 128);
    put(&mut out, MAGIC);
    put_regular_header(&mut out, false);
    put(&mut out, contents);
    put(&mut out, b")");
    out
}

/// Serialises the file, symlink or directory tree at `path` as Nix's
/// `dumpPath` does: a regular file is executable if its owner may execute
/// it, symlinks are not followed, and directory entries are sorted by
/// their names' bytes. Other file types are an error. `out` gets many small
/// writes between the file contents: buffer it if writes are costly.
pub fn dump_path(path: &Path, out: &mut impl Write) -> io::Result<()> {
    let mut pending = Vec::new();
    put(&mut pending, MAGIC);
    dump_node(path, out, &mut pending)?;
    out.write_all(&pending)
}

/// Dumps one node, collecting tokens in `pending` and writing them out
/// before each file's contents.
fn dump_node(path: &Path, out: &mut impl Write, pending: &mut Vec<u8>) -> io::Result<()> {
    let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let meta = fs::symlink_metadata(path).map_err(with_path)?;
    let file_type = meta.file_type();
    if file_type.is_file() {
        let file = fs::File::open(path).map_err(with_path)?;
        let len = file.metadata().map_err(with_path)?.len();
        put_regular_header(pending, meta.permissions().mode() & 0o100 != 0);
        pending.extend_from_slice(&len.to_le_bytes());
        out.write_all(pending)?;
        pending.clear();
        let copied = io::copy(&mut file.take(len), out).map_err(with_path)?;
        if copied != len {
            return Err(with_path(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file shrank from {len} to {copied} bytes while being read"),
            )));
        }
        pending.extend_from_slice(padding(len));
    } else if file_type.is_dir() {
        for token in [b"(" as &[u8], b"type", b"directory"] {
            put(pending, token);
        }
        let mut names = fs::read_dir(path)
            .and_then(|dir| dir.map(|entry| entry.map(|e| e.file_name())).collect::<io::Result<Vec<_>>>())
            .map_err(with_path)?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            for token in [b"entry" as &[u8], b"(", b"name", name.as_bytes(), b"node"] {
                put(pending, token);
            }
            dump_node(&path.join(name), out, pending)?;
            put(pending, b")");
        }
    } else if file_type.is_symlink() {
        let target = fs::read_link(path).map_err(with_path)?;
        for token in [b"(" as &[u8], b"type", b"symlink", b"target", target.as_os_str().as_bytes()] {
            put(pending, token);
        }
    } else {
        return Err(with_path(io::Error::new(io::ErrorKind::InvalidInput, "file has an unsupported type")));
    }
    put(pending, b")");
    Ok(())
}

fn bad(message: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("bad archive: {message}"))
}

/// Where a [`Parser`] is in the grammar: what it expects next.
#[derive(Clone, Copy, Debug)]
enum State {
    Magic,
    Open,
    Type,
    Kind,
    RegularTag,
    ExecutableValue,
    ContentsTag,
    Contents,
    TargetTag,
    Target,
    Close,
    EntryOrClose,
    EntryOpen,
    NameTag,
    Name,
    NodeTag,
    EntryClose,
    Done,
}

impl State {
    /// What is expected here, for error messages.
    fn expected(self) -> &'static str {
        match self {
            State::Magic => "'nix-archive-1'",
            State::Open | State::EntryOpen => "'('",
            State::Type => "'type'",
            State::Kind => "'regular', 'symlink' or 'directory'",
            State::RegularTag => "'executable' or 'contents'",
            State::ExecutableValue => "''",
            State::ContentsTag => "'contents'",
            State::Contents => "file contents",
            State::TargetTag => "'target'",
            State::Target => "a symlink target",
            State::Close | State::EntryClose => "')'",
            State::EntryOrClose => "'entry' or ')'",
            State::NameTag => "'name'",
            State::Name => "a file name",
            State::NodeTag => "'node'",
            State::Done => "the end of the archive",
        }
    }
}

/// What a [`Parser`] needs next from its input.
enum Need {
    /// A string, to pass to [`Parser::token`] once its length has passed
    /// [`Parser::check_len`].
    Token,
    /// A regular file's contents, then a call to [`Parser::contents_done`].
    Contents,
    /// Nothing: the archive is complete.
    Done,
}

/// What a token told the parser, for building a tree.
enum Event<'a> {
    Regular {
        executable: bool,
    },
    Symlink(&'a [u8]),
    Directory,
    Entry(&'a [u8]),
    /// The end of the current file, symlink or directory.
    End,
}

/// The NAR grammar as a state machine that does no I/O, so that the async
/// reader and the in-memory parser accept exactly the same archives.
struct Parser {
    state: State,
    /// For each open directory, the name of its last entry so far.
    dirs: Vec<Option<Vec<u8>>>,
}

impl Parser {
    fn new() -> Parser {
        Parser { state: State::Magic, dirs: Vec::new() }
    }

    fn need(&self) -> Need {
        match self.state {
            State::Contents => Need::Contents,
            State::Done => Need::Done,
            _ => Need::Token,
        }
    }

    /// Checks the length of the next token before it is read.
    fn check_len(&self, len: u64) -> io::Result<usize> {
        let max = match self.state {
            State::Name | State::Target => MAX_STRING_LEN,
            _ => MAX_KEYWORD_LEN,
        };
        match usize::try_from(len) {
            Ok(len) if len <= max => Ok(len),
            _ if matches!(self.state, State::Magic) => Err(bad("input doesn't look like a Nix archive")),
            _ => Err(bad(format!("expected {}, got a string of {len} bytes", self.state.expected()))),
        }
    }

    fn token<'t>(&mut self, token: &'t [u8]) -> io::Result<Option<Event<'t>>> {
        let mut event = None;
        self.state = match (self.state, token) {
            (State::Magic, MAGIC) => State::Open,
            (State::Magic, _) => return Err(bad("input doesn't look like a Nix archive")),
            (State::Open, b"(") => State::Type,
            (State::Type, b"type") => State::Kind,
            (State::Kind, b"regular") => State::RegularTag,
            (State::Kind, b"symlink") => State::TargetTag,
            (State::Kind, b"directory") => {
                if self.dirs.len() >= MAX_DEPTH {
                    return Err(bad(format!("directories are nested more than {MAX_DEPTH} deep")));
                }
                self.dirs.push(None);
                event = Some(Event::Directory);
                State::EntryOrClose
            }
            (State::RegularTag, b"executable") => State::ExecutableValue,
            (State::RegularTag, b"contents") => {
                event = Some(Event::Regular { executable: false });
                State::Contents
            }
            (State::ExecutableValue, b"") => State::ContentsTag,
            (State::ContentsTag, b"contents") => {
                event = Some(Event::Regular { executable: true });
                State::Contents
            }
            (State::TargetTag, b"target") => State::Target,
            (State::Target, target) => {
                event = Some(Event::Symlink(target));
                State::Close
            }
            (State::Close, b")") => {
                event = Some(Event::End);
                self.after_node()
            }
            (State::EntryOrClose, b"entry") => State::EntryOpen,
            (State::EntryOrClose, b")") => {
                self.dirs.pop();
                event = Some(Event::End);
                self.after_node()
            }
            (State::EntryOpen, b"(") => State::NameTag,
            (State::NameTag, b"name") => State::Name,
            (State::Name, name) => {
                self.check_name(name)?;
                event = Some(Event::Entry(name));
                State::NodeTag
            }
            (State::NodeTag, b"node") => State::Open,
            (State::EntryClose, b")") => State::EntryOrClose,
            (state, token) => {
                return Err(bad(format!("expected {}, got '{}'", state.expected(), token.escape_ascii())));
            }
        };
        Ok(event)
    }

    /// Checks an entry name and that it sorts after the previous one.
    fn check_name(&mut self, name: &[u8]) -> io::Result<()> {
        if matches!(name, b"" | b"." | b"..") || name.contains(&b'/') || name.contains(&0) {
            return Err(bad(format!("invalid file name '{}'", name.escape_ascii())));
        }
        let Some(last) = self.dirs.last_mut() else {
            return Err(bad("file name outside a directory"));
        };
        if let Some(prev) = last.as_deref().filter(|prev| name <= *prev) {
            return Err(bad(format!(
                "directory is not sorted: '{}' after '{}'",
                name.escape_ascii(),
                prev.escape_ascii()
            )));
        }
        *last = Some(name.to_vec());
        Ok(())
    }

    fn contents_done(&mut self) {
        self.state = State::Close;
    }

    /// The state after a node's closing ")".
    fn after_node(&self) -> State {
        if self.dirs.is_empty() { State::Done } else { State::EntryClose }
    }
}

/// Reads one NAR from `r`, appending its bytes to `out`, and stops at its
/// end. Malformed archives are `InvalidData`; a truncated one is
/// `UnexpectedEof`. After an error, what was appended to `out` is unspecified.
pub async fn read_nar<R: AsyncRead + Unpin + ?Sized>(r: &mut R, out: &mut Vec<u8>) -> io::Result<()> {
    let mut parser = Parser::new();
    loop {
        match parser.need() {
            Need::Done => return Ok(()),
            Need::Token => {
                let len = parser.check_len(read_len(r, out).await?)?;
                let start = out.len();
                out.resize(start + len, 0);
                r.read_exact(&mut out[start..]).await?;
                read_padding(r, out, len as u64).await?;
                parser.token(&out[start..start + len])?;
            }
            Need::Contents => {
                let len = read_len(r, out).await?;
                let copied = tokio::io::copy(&mut (&mut *r).take(len), out).await?;
                if copied != len {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("NAR ended after {copied} of a file's {len} bytes"),
                    ));
                }
                read_padding(r, out, len).await?;
                parser.contents_done();
            }
        }
    }
}

async fn read_len<R: AsyncRead + Unpin + ?Sized>(r: &mut R, out: &mut Vec<u8>) -> io::Result<u64> {
    let mut buf = [0; 8];
    r.read_exact(&mut buf).await?;
    out.extend_from_slice(&buf);
    Ok(u64::from_le_bytes(buf))
}

async fn read_padding<R: AsyncRead + Unpin + ?Sized>(r: &mut R, out: &mut Vec<u8>, len: u64) -> io::Result<()> {
    let mut buf = [0; 8];
    let pad = &mut buf[..padding(len).len()];
    r.read_exact(pad).await?;
    check_padding(pad)?;
    out.extend_from_slice(pad);
    Ok(())
}

fn check_padding(pad: &[u8]) -> io::Result<()> {
    if pad.iter().any(|&b| b != 0) {
        return Err(bad("non-zero padding"));
    }
    Ok(())
}

/// Parses a NAR held in memory, which must be exactly one archive. Names and
/// symlink targets must be UTF-8 to fit [`NarEntry`].
pub fn parse_nar(bytes: &[u8]) -> io::Result<NarEntry> {
    let mut input = bytes;
    let mut parser = Parser::new();
    let mut tree = TreeBuilder::default();
    loop {
        match parser.need() {
            Need::Done => break,
            Need::Token => {
                let len = parser.check_len(take_len(&mut input)?)?;
                if let Some(event) = parser.token(take_padded(&mut input, len as u64)?)? {
                    tree.event(event)?;
                }
            }
            Need::Contents => {
                let len = take_len(&mut input)?;
                tree.contents(take_padded(&mut input, len)?);
                parser.contents_done();
            }
        }
    }
    if !input.is_empty() {
        return Err(bad(format!("{} bytes after the end of the archive", input.len())));
    }
    tree.root.ok_or_else(|| bad("no root node"))
}

fn take<'a>(input: &mut &'a [u8], n: u64) -> io::Result<&'a [u8]> {
    let split = usize::try_from(n).ok().and_then(|n| input.split_at_checked(n));
    let Some((head, rest)) = split else {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "NAR is truncated"));
    };
    *input = rest;
    Ok(head)
}

fn take_len(input: &mut &[u8]) -> io::Result<u64> {
    let mut buf = [0; 8];
    buf.copy_from_slice(take(input, 8)?);
    Ok(u64::from_le_bytes(buf))
}

fn take_padded<'a>(input: &mut &'a [u8], len: u64) -> io::Result<&'a [u8]> {
    let data = take(input, len)?;
    check_padding(take(input, padding(len).len() as u64)?)?;
    Ok(data)
}

/// Builds a [`NarEntry`] from parser events.
#[derive(Default)]
struct TreeBuilder {
    /// Open directories, each with its name in its parent ("" for the root).
    dirs: Vec<(String, BTreeMap<String, NarEntry>)>,
    /// The name of the entry being parsed.
    name: String,
    /// The regular file or symlink being parsed.
    leaf: Option<NarEntry>,
    root: Option<NarEntry>,
}

impl TreeBuilder {
    fn event(&mut self, event: Event<'_>) -> io::Result<()> {
        match event {
            Event::Directory => self.dirs.push((mem::take(&mut self.name), BTreeMap::new())),
            Event::Entry(name) => self.name = utf8(name, "file name")?,
            Event::Regular { executable } => {
                self.leaf = Some(NarEntry::Regular { executable, contents: Vec::new() });
            }
            Event::Symlink(target) => {
                self.leaf = Some(NarEntry::Symlink { target: utf8(target, "symlink target")? });
            }
            Event::End => {
                let (name, node) = match self.leaf.take() {
                    Some(leaf) => (mem::take(&mut self.name), leaf),
                    None => {
                        let (name, entries) = self.dirs.pop().ok_or_else(|| bad("unbalanced ')'"))?;
                        (name, NarEntry::Directory(entries))
                    }
                };
                match self.dirs.last_mut() {
                    Some((_, entries)) => {
                        entries.insert(name, node);
                    }
                    None => self.root = Some(node),
                }
            }
        }
        Ok(())
    }

    fn contents(&mut self, data: &[u8]) {
        if let Some(NarEntry::Regular { contents, .. }) = &mut self.leaf {
            contents.extend_from_slice(data);
        }
    }
}

fn utf8(bytes: &[u8], what: &str) -> io::Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| bad(format!("{what} '{}' is not UTF-8", bytes.escape_ascii())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::{HashAlgo, HashSink};
    use std::os::unix::fs::symlink;
    use std::path::PathBuf;
    use tokio::io::AsyncWriteExt;

    /// A NAR made of these strings (file contents are encoded the same way).
    fn tokens(tokens: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for token in tokens {
            put(&mut out, token);
        }
        out
    }

    fn regular(executable: bool, contents: &[u8]) -> NarEntry {
        NarEntry::Regular { executable, contents: contents.to_vec() }
    }

    fn symlink_to(target: &str) -> NarEntry {
        NarEntry::Symlink { target: target.to_owned() }
    }

    fn dir<const N: usize>(entries: [(&str, NarEntry); N]) -> NarEntry {
        NarEntry::Directory(entries.into_iter().map(|(n, e)| (n.to_owned(), e)).collect())
    }

    /// Reads with `read_nar` from a pipe that passes at most 7 bytes at a time,
    /// with `trailer` written after the NAR; checks the trailer is left unread.
    async fn read_nar_chunked(nar: &[u8], trailer: &[u8]) -> io::Result<Vec<u8>> {
        let (mut writer, mut reader) = tokio::io::duplex(7);
        let input = [nar, trailer].concat();
        let feed = tokio::spawn(async move {
            // The reader may stop early on bad input; then the write fails.
            let _ = writer.write_all(&input).await;
        });
        let mut out = Vec::new();
        let result = read_nar(&mut reader, &mut out).await;
        if result.is_ok() {
            let mut rest = vec![0; trailer.len()];
            reader.read_exact(&mut rest).await?;
            assert_eq!(rest, trailer);
        }
        drop(reader);
        feed.await?;
        result.map(|()| out)
    }

    /// `read_nar` from a slice behind a trait object, outside any runtime.
    fn read_nar_sync(mut nar: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let reader: &mut (dyn AsyncRead + Unpin + Send) = &mut nar;
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        rt.block_on(read_nar(reader, &mut out))?;
        Ok(out)
    }

    fn assert_invalid(nar: &[u8], needle: &str) {
        let err = parse_nar(nar).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains(needle), "expected '{needle}' in '{err}'");
        let err = read_nar_sync(nar).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains(needle), "expected '{needle}' in '{err}'");
    }

    /// A directory under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let path = std::env::temp_dir().join(format!("rust-store-nar-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// The bytes of Nix 2.26.3's `nix-store --dump` of a file holding "hello\n".
    #[test]
    fn flat_file_matches_nix() {
        let expected = [
            &b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-arch"[..],
            b"ive-1\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00",
            b"(\x00\x00\x00\x00\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00",
            b"type\x00\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00\x00",
            b"regular\x00\x08\x00\x00\x00\x00\x00\x00\x00",
            b"contents\x06\x00\x00\x00\x00\x00\x00\x00",
            b"hello\x0a\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00",
            b")\x00\x00\x00\x00\x00\x00\x00",
        ]
        .concat();
        assert_eq!(dump_flat_file_contents(b"hello\n"), expected);
        assert_eq!(write_nar(&regular(false, b"hello\n")), expected);
        assert_eq!(parse_nar(&expected).unwrap(), regular(false, b"hello\n"));
    }

    /// A tree whose `nix-store --dump` (Nix 2.26.3) is 2016 bytes with the
    /// SHA-256 below.
    #[test]
    fn dump_path_matches_nix() {
        let tmp = TempDir::new("dump");
        let root = tmp.0.join("tree");
        fs::create_dir_all(root.join("sub/deep")).unwrap();
        fs::write(root.join("a"), "hello\n").unwrap();
        fs::write(root.join("exe"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(root.join("exe"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(root.join("empty"), "").unwrap();
        symlink("a", root.join("link")).unwrap();
        fs::write(root.join("sub/B"), "12345678").unwrap();
        symlink("/nix/store/nonexistent", root.join("sub/dangling")).unwrap();
        fs::write(root.join("Z"), "zz").unwrap();
        fs::write(root.join(".hidden"), "h").unwrap();

        let mut sink = HashSink::new(HashAlgo::Sha256);
        dump_path(&root, &mut sink).unwrap();
        let (hash, size) = sink.finish();
        assert_eq!(hash.to_base16(), "ef5ea75b2ecabd9aa3b0aa23ddd7e3c9355cf961de5662dafe779de74efbb541");
        assert_eq!(size, 2016);

        let mut nar = Vec::new();
        dump_path(&root, &mut nar).unwrap();
        let expected = dir([
            (".hidden", regular(false, b"h")),
            ("Z", regular(false, b"zz")),
            ("a", regular(false, b"hello\n")),
            ("empty", regular(false, b"")),
            ("exe", regular(true, b"#!/bin/sh\n")),
            ("link", symlink_to("a")),
            (
                "sub",
                dir([
                    ("B", regular(false, b"12345678")),
                    ("dangling", symlink_to("/nix/store/nonexistent")),
                    ("deep", dir([])),
                ]),
            ),
        ]);
        assert_eq!(parse_nar(&nar).unwrap(), expected);
        assert_eq!(write_nar(&expected), nar);

        // Single files and symlinks at the top.
        let digest = |path: &Path| {
            let mut sink = HashSink::new(HashAlgo::Sha256);
            dump_path(path, &mut sink).unwrap();
            sink.finish()
        };
        let (hash, size) = digest(&root.join("link"));
        assert_eq!(hash.to_base16(), "b2d471a08d30662f14c0ae1e718b16f9fc1f38de425f47cca0437e9e93bc1f24");
        assert_eq!(size, 120);
        let (hash, size) = digest(&root.join("exe"));
        assert_eq!(hash.to_base16(), "6283c1668260f903d1a895c0cd6b822fa4b68762bb0b17cedef2d39d97e26554");
        assert_eq!(size, 160);

        let err = dump_path(&root.join("missing"), &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn dump_path_rejects_sockets() {
        let tmp = TempDir::new("socket");
        let socket = tmp.0.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let err = dump_path(&tmp.0, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("unsupported type"), "{err}");
    }

    /// Random trees survive write_nar → parse_nar, and read_nar takes exactly their bytes.
    #[tokio::test]
    async fn random_trees_round_trip() {
        let mut state = 0x853c_49e6_748f_ea9bu64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        fn tree(next: &mut impl FnMut(u64) -> u64, depth: u32) -> NarEntry {
            const NAMES: [&str; 8] = ["a", "b", "B", ".x", "a.b", "\u{e9}t\u{e9}", "-", "zz"];
            match next(if depth == 0 { 2 } else { 3 }) {
                0 => {
                    let len = [0, 1, 7, 8, 9, 100][next(6) as usize];
                    let contents = (0..len).map(|_| next(256) as u8).collect::<Vec<_>>();
                    regular(next(2) == 0, &contents)
                }
                1 => symlink_to(&"../x".repeat(next(4) as usize)),
                _ => NarEntry::Directory(
                    (0..next(5)).map(|_| (NAMES[next(8) as usize].to_owned(), tree(next, depth - 1))).collect(),
                ),
            }
        }
        for _ in 0..200 {
            let entry = tree(&mut next, 4);
            let nar = write_nar(&entry);
            assert_eq!(nar.len() % 8, 0);
            assert_eq!(parse_nar(&nar).unwrap(), entry);
            assert_eq!(read_nar_chunked(&nar, b"trailing").await.unwrap(), nar);
        }
    }

    #[tokio::test]
    async fn large_contents_are_streamed() {
        let contents: Vec<u8> = (0..1_000_003u32).map(|i| (i % 253) as u8).collect();
        let nar = dump_flat_file_contents(&contents);
        assert_eq!(read_nar_chunked(&nar, b"x").await.unwrap(), nar);
        assert_eq!(parse_nar(&nar).unwrap(), regular(false, &contents));
    }

    #[test]
    fn rejects_malformed_archives() {
        let m: &[u8] = MAGIC;
        let file: &[&[u8]] = &[b"(", b"type", b"regular", b"contents", b"", b")"];
        let with_entries = |entries: &[&[u8]]| {
            let mut t: Vec<&[u8]> = vec![m, b"(", b"type", b"directory"];
            for name in entries {
                t.extend([b"entry" as &[u8], b"(", b"name", name, b"node"]);
                t.extend(file);
                t.push(b")");
            }
            t.push(b")");
            tokens(&t)
        };
        assert!(parse_nar(&with_entries(&[b"a", b"b"])).is_ok());

        assert_invalid(&tokens(&[b"nix-archive-2"]), "doesn't look like a Nix archive");
        assert_invalid(&tokens(&[b"nix-archive-1-and-more"]), "doesn't look like a Nix archive");
        assert_invalid(
            &tokens(&[m, b"(", b"type", b"fifo", b")"]),
            "expected 'regular', 'symlink' or 'directory', got 'fifo'",
        );
        assert_invalid(&tokens(&[m, b"[", b"type"]), "expected '(', got '['");
        assert_invalid(&tokens(&[m, b"(", b"type", b"regular", b")"]), "expected 'executable' or 'contents'");
        assert_invalid(&tokens(&[m, b"(", b"type", b"regular", b"executable", b"1"]), "expected '', got '1'");
        assert_invalid(&tokens(&[m, b"(", b"type", b"symlink", b"target", b"x", b"extra"]), "expected ')'");
        assert_invalid(&with_entries(&[b"b", b"a"]), "not sorted: 'a' after 'b'");
        assert_invalid(&with_entries(&[b"a", b"a"]), "not sorted: 'a' after 'a'");
        assert_invalid(&with_entries(&[b"B", b"a", b"A"]), "not sorted");
        for name in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            assert_invalid(&with_entries(&[name]), "invalid file name");
        }
        assert_invalid(
            &with_entries(&[&[b'n'; MAX_STRING_LEN + 1]]),
            "expected a file name, got a string of 4097 bytes",
        );
        assert!(parse_nar(&with_entries(&[&[b'n'; MAX_STRING_LEN]])).is_ok());

        // Non-zero padding, in a token and after contents.
        let mut nar = dump_flat_file_contents(b"x");
        // The last padding byte of the contents "x", before the final ")".
        let last = nar.len() - 17;
        nar[last] = 1;
        assert_invalid(&nar, "non-zero padding");
        let mut nar = tokens(&[m, b"(", b"typ"]);
        *nar.last_mut().unwrap() = 1;
        assert_invalid(&nar, "non-zero padding");

        // Extra bytes are not part of the archive.
        let mut nar = dump_flat_file_contents(b"x");
        nar.extend_from_slice(&[0; 8]);
        assert_invalid_parse_only(&nar, "8 bytes after the end");
    }

    fn assert_invalid_parse_only(nar: &[u8], needle: &str) {
        let err = parse_nar(nar).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains(needle), "{err}");
    }

    #[test]
    fn nesting_is_limited() {
        let nested = |depth: usize| {
            let mut t: Vec<&[u8]> = vec![MAGIC];
            for _ in 0..depth {
                t.extend([b"(" as &[u8], b"type", b"directory", b"entry", b"(", b"name", b"d", b"node"]);
            }
            t.extend([b"(" as &[u8], b"type", b"regular", b"contents", b"", b")"]);
            for _ in 0..depth {
                t.extend([b")" as &[u8], b")"]);
            }
            tokens(&t)
        };
        assert!(parse_nar(&nested(MAX_DEPTH)).is_ok());
        assert_invalid(&nested(MAX_DEPTH + 1), "nested more than 2048 deep");
    }

    #[test]
    fn truncation_and_huge_lengths() {
        let nar = write_nar(&dir([("a", regular(true, b"contents")), ("b", symlink_to("a"))]));
        for len in 0..nar.len() {
            let err = read_nar_sync(&nar[..len]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{len}: {err}");
            let err = parse_nar(&nar[..len]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{len}: {err}");
        }
        // A file claiming u64::MAX bytes allocates nothing up front.
        let mut huge = tokens(&[MAGIC, b"(", b"type", b"regular", b"contents"]);
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        huge.extend_from_slice(b"only this");
        let err = read_nar_sync(&huge).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(parse_nar(&huge).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // So does a name claiming u64::MAX bytes.
        let mut huge = tokens(&[MAGIC, b"(", b"type", b"directory", b"entry", b"(", b"name"]);
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert_invalid(&huge, "got a string of 18446744073709551615 bytes");
    }

    #[tokio::test]
    async fn non_utf8_is_only_a_problem_for_the_tree() {
        let nar = tokens(&[MAGIC, b"(", b"type", b"symlink", b"target", b"\xff", b")"]);
        assert_eq!(read_nar_chunked(&nar, b"").await.unwrap(), nar);
        let err = parse_nar(&nar).unwrap_err();
        assert!(err.to_string().contains("symlink target '\\xff' is not UTF-8"), "{err}");
    }
}
