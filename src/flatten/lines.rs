//! Newline framing over arbitrary chunks: carries the partial last line between calls, counts
//! line numbers and byte offsets, and bounds the length of one line so that a file without
//! newlines cannot exhaust memory.
//!
//! A UTF-8 byte-order mark (`EF BB BF`) at the very start of the input is skipped: some
//! Windows tools and servers write one, and left in place it would make the first resource
//! "malformed JSON". It is part of no line, and offsets stay absolute positions in the file, so
//! after a BOM the first line starts at offset 3 — the offset of its first real byte, where a
//! reject record must point. Only a splitter that starts the file (line 1, offset 0) looks for
//! one: a byte range that starts mid-file has none. The mark may arrive split over chunks; a
//! start that only looks like one (`EF BB` then something else) is kept as line data.

/// One complete line handed out by [`LineSplitter`] (without `\n` / `\r\n`).
#[derive(Debug, PartialEq, Eq)]
pub struct Line<'a> {
    /// 1-based line number in the file.
    pub number: u64,
    /// Byte offset of the line's first byte in the (decompressed) file.
    pub offset: u64,
    /// The bytes, or `None` when the line exceeded the limit (`len` says how long it was).
    pub bytes: Option<&'a [u8]>,
    /// Length in bytes (without the line terminator).
    pub len: u64,
}

/// Splits a byte stream into lines; push-based, knows no I/O.
#[derive(Debug)]
pub struct LineSplitter {
    carry: Vec<u8>,
    number: u64,
    /// Absolute offset of the first byte of the next chunk.
    pos: u64,
    /// Absolute offset of the line being assembled.
    line_start: u64,
    /// The current line is over the limit and its bytes are being skipped.
    skipping: bool,
    max_line: usize,
    /// Number of the first line and offset of the first byte (see [`LineSplitter::starting_at`]).
    first_line: u64,
    start: u64,
    /// Bytes of a leading byte-order mark matched so far, while the input may still start
    /// with one; `None` once decided (or when the input does not start the file).
    bom: Option<u8>,
}

/// The UTF-8 byte-order mark.
pub(super) const BOM: &[u8; 3] = b"\xEF\xBB\xBF";

impl LineSplitter {
    /// A splitter that hands out lines longer than `max_line` bytes as `bytes: None`.
    pub fn new(max_line: usize) -> Self {
        Self::starting_at(max_line, 1, 0)
    }

    /// A splitter for input that starts mid-file, at the first byte of line number `line`
    /// (1-based) and absolute byte offset `offset`: lines are numbered and located as in the
    /// whole file. Used when one file is decoded in byte ranges by several workers. Only at
    /// line 1, offset 0 is a leading byte-order mark skipped (see the [module docs](self)).
    pub fn starting_at(max_line: usize, line: u64, offset: u64) -> Self {
        LineSplitter {
            carry: Vec::new(),
            number: line,
            pos: offset,
            line_start: offset,
            skipping: false,
            max_line,
            first_line: line,
            start: offset,
            bom: (line == 1 && offset == 0).then_some(0),
        }
    }

    /// While the input may start with a byte-order mark: consume the bytes of `chunk` that
    /// continue it and return the rest. Once the whole mark is seen, the first line starts
    /// after it; on a mismatch the bytes held back are line data after all.
    fn skip_bom<'c>(&mut self, chunk: &'c [u8]) -> &'c [u8] {
        let Some(mut seen) = self.bom else {
            return chunk;
        };
        let mut rest = chunk;
        while let Some((&b, tail)) = rest.split_first() {
            if b != BOM[usize::from(seen)] {
                self.carry.extend_from_slice(&BOM[..usize::from(seen)]);
                self.bom = None;
                return rest;
            }
            seen += 1;
            rest = tail;
            self.pos += 1;
            if usize::from(seen) == BOM.len() {
                self.line_start = self.pos;
                self.bom = None;
                return rest;
            }
        }
        self.bom = Some(seen);
        rest
    }

    /// Feed a chunk; `f` is called for every line completed by it.
    pub fn push<E>(
        &mut self,
        chunk: &[u8],
        mut f: impl FnMut(Line<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let chunk = self.skip_bom(chunk);
        let mut rest = chunk;
        let mut base = self.pos;
        while let Some(nl) = memchr::memchr(b'\n', rest) {
            let head = &rest[..nl];
            let end = base + nl as u64; // absolute position of '\n'
            let len = end - self.line_start;
            let line = Line {
                number: self.number,
                offset: self.line_start,
                bytes: None,
                len,
            };
            if self.skipping {
                self.skipping = false;
                f(Line {
                    len: trim_len(len, head.last().or(self.carry.last())),
                    ..line
                })?;
            } else if self.carry.is_empty() {
                let bytes = strip_cr(head);
                let ok = bytes.len() <= self.max_line;
                f(Line {
                    bytes: ok.then_some(bytes),
                    len: bytes.len() as u64,
                    ..line
                })?;
            } else {
                let mut carry = std::mem::take(&mut self.carry);
                carry.extend_from_slice(head);
                let bytes = strip_cr(&carry);
                let ok = bytes.len() <= self.max_line;
                let r = f(Line {
                    bytes: ok.then_some(bytes),
                    len: bytes.len() as u64,
                    ..line
                });
                carry.clear();
                self.carry = carry;
                r?;
            }
            self.number += 1;
            self.line_start = end + 1;
            base = end + 1;
            rest = &rest[nl + 1..];
        }
        if !self.skipping {
            if self.carry.len() + rest.len() > self.max_line.saturating_add(1) {
                self.skipping = true;
                self.carry = Vec::new();
            } else {
                self.carry.extend_from_slice(rest);
            }
        }
        self.pos += chunk.len() as u64;
        Ok(())
    }

    /// End of input: hands out a last line that has no trailing newline, if any.
    pub fn finish<E>(&mut self, mut f: impl FnMut(Line<'_>) -> Result<(), E>) -> Result<(), E> {
        if let Some(seen) = self.bom.take() {
            // The input ended inside what looked like a byte-order mark: it was data.
            self.carry.extend_from_slice(&BOM[..usize::from(seen)]);
        }
        let len = self.pos - self.line_start;
        if len == 0 {
            return Ok(());
        }
        let line = Line {
            number: self.number,
            offset: self.line_start,
            bytes: None,
            len,
        };
        let r = if self.skipping {
            f(line)
        } else {
            let carry = std::mem::take(&mut self.carry);
            let bytes = strip_cr(&carry);
            f(Line {
                bytes: Some(bytes),
                len: bytes.len() as u64,
                ..line
            })
        };
        self.skipping = false;
        self.number += 1;
        self.line_start = self.pos;
        r
    }

    /// Lines completed so far.
    pub fn lines(&self) -> u64 {
        self.number - self.first_line
    }

    /// Bytes pushed so far (not counting the start offset; a skipped byte-order mark counts).
    pub fn bytes(&self) -> u64 {
        self.pos - self.start
    }
}

fn strip_cr(b: &[u8]) -> &[u8] {
    b.strip_suffix(b"\r").unwrap_or(b)
}

fn trim_len(len: u64, last: Option<&u8>) -> u64 {
    if last == Some(&b'\r') {
        len.saturating_sub(1)
    } else {
        len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Out = Vec<(u64, u64, Option<String>, u64)>;

    fn split(input: &[u8], chunk: usize, max: usize) -> Out {
        split_at(LineSplitter::new(max), input, chunk)
    }

    fn split_at(mut s: LineSplitter, input: &[u8], chunk: usize) -> Out {
        let mut out = Vec::new();
        let mut sink = |l: Line<'_>| -> Result<(), ()> {
            out.push((
                l.number,
                l.offset,
                l.bytes.map(|b| String::from_utf8_lossy(b).into_owned()),
                l.len,
            ));
            Ok(())
        };
        for c in input.chunks(chunk) {
            s.push(c, &mut sink).unwrap();
        }
        s.finish(&mut sink).unwrap();
        out
    }

    #[test]
    fn chunking_does_not_matter() {
        let input = b"{\"a\":1}\r\n\n{\"b\":22}\nxyz";
        let want = vec![
            (1, 0, Some("{\"a\":1}".to_string()), 7),
            (2, 9, Some(String::new()), 0),
            (3, 10, Some("{\"b\":22}".to_string()), 8),
            (4, 19, Some("xyz".to_string()), 3),
        ];
        for chunk in [1, 2, 3, 5, 7, 100] {
            assert_eq!(split(input, chunk, 1 << 20), want, "chunk {chunk}");
        }
    }

    #[test]
    fn long_lines_are_reported_not_buffered() {
        let input = b"short\n0123456789abcdef\nok\n0123456789";
        for chunk in [1, 3, 7, 100] {
            let got = split(input, chunk, 8);
            assert_eq!(got[0], (1, 0, Some("short".into()), 5));
            assert_eq!(got[1], (2, 6, None, 16), "chunk {chunk}");
            assert_eq!(got[2], (3, 23, Some("ok".into()), 2));
            assert_eq!(got[3], (4, 26, None, 10));
        }
    }

    /// `(number, offset, bytes, len)` of every line of `input` fed in `chunk`-byte pieces.
    fn split_bytes(
        mut s: LineSplitter,
        input: &[u8],
        chunk: usize,
    ) -> Vec<(u64, u64, Vec<u8>, u64)> {
        let mut out = Vec::new();
        let mut sink = |l: Line<'_>| -> Result<(), ()> {
            out.push((
                l.number,
                l.offset,
                l.bytes.unwrap_or(b"<long>").to_vec(),
                l.len,
            ));
            Ok(())
        };
        for c in input.chunks(chunk) {
            s.push(c, &mut sink).unwrap();
        }
        s.finish(&mut sink).unwrap();
        out
    }

    #[test]
    fn a_leading_byte_order_mark_is_skipped_at_any_chunk_size() {
        let input = b"\xEF\xBB\xBF{\"a\":1}\r\n{\"b\":22}\nxyz";
        let want = vec![
            (1, 3, b"{\"a\":1}".to_vec(), 7),
            (2, 12, b"{\"b\":22}".to_vec(), 8),
            (3, 21, b"xyz".to_vec(), 3),
        ];
        for chunk in [1, 2, 3, 4, 5, 100] {
            let mut s = LineSplitter::new(1 << 20);
            assert_eq!(
                split_bytes(LineSplitter::new(1 << 20), input, chunk),
                want,
                "chunk {chunk}"
            );
            // The mark counts as input bytes, not as a line.
            for c in input.chunks(chunk) {
                s.push(c, |_| Ok::<_, ()>(())).unwrap();
            }
            s.finish(|_| Ok::<_, ()>(())).unwrap();
            assert_eq!((s.bytes(), s.lines()), (input.len() as u64, 3));
        }
        // Only the mark: no line. The mark and a newline: one blank line after it.
        for chunk in [1, 2, 3] {
            let bom_only = split_bytes(LineSplitter::new(64), b"\xEF\xBB\xBF", chunk);
            assert_eq!(bom_only, vec![]);
            let blank = split_bytes(LineSplitter::new(64), b"\xEF\xBB\xBF\n", chunk);
            assert_eq!(blank, vec![(1, 3, vec![], 0)]);
        }
        // The length limit counts the line, not the mark.
        let got = split_bytes(LineSplitter::new(5), b"\xEF\xBB\xBF12345\n123456\n", 1);
        assert_eq!(got[0], (1, 3, b"12345".to_vec(), 5));
        assert_eq!(got[1], (2, 9, b"<long>".to_vec(), 6));
    }

    #[test]
    fn only_a_whole_mark_at_the_start_of_the_file_is_skipped() {
        for chunk in [1, 2, 3, 100] {
            // A second mark is data.
            let twice = split_bytes(LineSplitter::new(64), b"\xEF\xBB\xBF\xEF\xBB\xBFx\n", chunk);
            assert_eq!(
                twice,
                vec![(1, 3, b"\xEF\xBB\xBFx".to_vec(), 4)],
                "chunk {chunk}"
            );
            // Something that starts like a mark is kept whole, at offset 0.
            for input in [&b"\xEF\xBBx\ny"[..], b"\xEFx\ny", b"\xEF\xBB\ny"] {
                let got = split_bytes(LineSplitter::new(64), input, chunk);
                let nl = input.iter().position(|b| *b == b'\n').unwrap();
                assert_eq!(
                    got,
                    vec![
                        (1, 0, input[..nl].to_vec(), nl as u64),
                        (2, nl as u64 + 1, b"y".to_vec(), 1)
                    ],
                    "{input:?} chunk {chunk}"
                );
            }
            // The input ends inside a would-be mark: its bytes are the last line.
            let cut = split_bytes(LineSplitter::new(64), b"\xEF\xBB", chunk);
            assert_eq!(cut, vec![(1, 0, b"\xEF\xBB".to_vec(), 2)]);
            // A range that starts mid-file has no mark: the bytes are data.
            let mid = split_bytes(
                LineSplitter::starting_at(64, 7, 70),
                b"\xEF\xBB\xBFx\n",
                chunk,
            );
            assert_eq!(mid, vec![(7, 70, b"\xEF\xBB\xBFx".to_vec(), 4)]);
            let mid_line1 = split_bytes(
                LineSplitter::starting_at(64, 1, 70),
                b"\xEF\xBB\xBFx\n",
                chunk,
            );
            assert_eq!(mid_line1, vec![(1, 70, b"\xEF\xBB\xBFx".to_vec(), 4)]);
        }
    }

    #[test]
    fn starting_at_numbers_lines_as_in_the_whole_file() {
        let input = b"{\"a\":1}\r\n\n{\"b\":22}\nxyz\n0123456789abcdef\nlast";
        for chunk in [1, 3, 100] {
            let whole = split(input, chunk, 8);
            // Cut after every newline; each tail, started at its line and offset, gives the same lines.
            let mut line = 1;
            for (i, _) in input.iter().enumerate().filter(|(_, b)| **b == b'\n') {
                line += 1;
                let off = i as u64 + 1;
                let mut s = LineSplitter::starting_at(8, line, off);
                let mut got = Vec::new();
                let mut sink = |l: Line<'_>| -> Result<(), ()> {
                    got.push((l.number, l.offset));
                    Ok(())
                };
                for c in input[i + 1..].chunks(chunk) {
                    s.push(c, &mut sink).unwrap();
                }
                s.finish(&mut sink).unwrap();
                assert_eq!(s.bytes(), (input.len() - i - 1) as u64);
                assert_eq!(s.lines(), got.len() as u64);
                let want: Vec<_> = whole[line as usize - 1..]
                    .iter()
                    .map(|(n, o, ..)| (*n, *o))
                    .collect();
                assert_eq!(got, want, "from line {line}, chunk {chunk}");
            }
        }
        // The full tuple through the shared helper, for one cut.
        let tail = split_at(LineSplitter::starting_at(1 << 20, 3, 10), &input[10..], 4);
        assert_eq!(tail[0], (3, 10, Some("{\"b\":22}".to_string()), 8));
    }
}
