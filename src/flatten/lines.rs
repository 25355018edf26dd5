//! Newline framing over arbitrary chunks: carries the partial last line between calls, counts
//! line numbers and byte offsets, and bounds the length of one line so that a file without
//! newlines cannot exhaust memory.

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
}

impl LineSplitter {
    /// A splitter that hands out lines longer than `max_line` bytes as `bytes: None`.
    pub fn new(max_line: usize) -> Self {
        Self::starting_at(max_line, 1, 0)
    }

    /// A splitter for input that starts mid-file, at the first byte of line number `line`
    /// (1-based) and absolute byte offset `offset`: lines are numbered and located as in the
    /// whole file. Used when one file is decoded in byte ranges by several workers.
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
        }
    }

    /// Feed a chunk; `f` is called for every line completed by it.
    pub fn push<E>(
        &mut self,
        chunk: &[u8],
        mut f: impl FnMut(Line<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
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

    /// Bytes pushed so far (not counting the start offset).
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
