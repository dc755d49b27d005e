//! A hand-written equivalent of Qwen (v1)'s pre-tokenisation regex
//!
//! ```text
//! (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//! ```
//!
//! with the semantics of tiktoken's matcher (`fancy-regex` over the `regex` crate: leftmost-first alternation,
//! greedy repetition with backtracking, `\s` = Unicode `White_Space`, `\p{L}`/`\p{N}` = general categories,
//! `(?i)` = simple case folding). Character classes come from `regex-syntax`, the very tables that crate uses.
//!
//! Every character is a Letter, a Number, white space, or "other", so the alternatives cover every position and
//! the matches tile the text: [`Splitter::next_end`] gives the end of the piece that starts at a given offset.
//! Worked out per alternative, for the character `c` at the start:
//! 1. `'` followed by `s t m d` or `re ve ll` in any case (`s` also matches `ſ` U+017F under case folding).
//! 2. `c` a letter: the run of letters. `c` neither CR/LF nor letter nor number, followed by a letter:
//!    `c` plus the run of letters.
//! 3. `c` a number: `c` alone.
//! 4. `c` "other" (not space, letter, number), or `c` = U+0020 followed by "other": optional space, the run of
//!    "other", then the run of CR/LF.
//! 5. `c` white space (what is left): the white-space run `w`. If `w` holds CR or LF, up to and including the
//!    last CR/LF in `w` (`\s*` backtracks to the last position followed by `[\r\n]`).
//! 6. Else, if `w` reaches the end of the text, all of `w`; if `w` has two or more characters, all of `w` but its
//!    last character (so that the last one can prefix the next word); else `w` (alternative 7).
use regex_syntax::hir::{Class, HirKind};
use std::sync::OnceLock;

/// Character classes as the split pattern sees them.
pub(crate) const OTHER: u8 = 0;
pub(crate) const LETTER: u8 = 1;
pub(crate) const NUMBER: u8 = 2;
/// White space other than CR and LF.
pub(crate) const SPACE: u8 = 3;
/// CR or LF (also white space).
pub(crate) const NEWLINE: u8 = 4;

pub(crate) struct CharClasses {
    /// Class of every code point of the Basic Multilingual Plane.
    bmp: Box<[u8]>,
    /// Sorted, disjoint ranges (start, end inclusive, class) above the BMP, for classes other than OTHER.
    astral: Vec<(u32, u32, u8)>,
}

fn unicode_ranges(pattern: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::parse(pattern).expect("valid class pattern");
    match hir.kind() {
        HirKind::Class(Class::Unicode(cls)) => {
            cls.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect()
        }
        other => panic!("{pattern} did not parse to a Unicode class: {other:?}"),
    }
}

impl CharClasses {
    fn build() -> CharClasses {
        let mut bmp = vec![OTHER; 0x10000].into_boxed_slice();
        let mut astral = Vec::new();
        for (pattern, class) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            for (start, end) in unicode_ranges(pattern) {
                for cp in start..=end.min(0xFFFF) {
                    bmp[cp as usize] = class;
                }
                if end > 0xFFFF {
                    astral.push((start.max(0x10000), end, class));
                }
            }
        }
        bmp['\r' as usize] = NEWLINE;
        bmp['\n' as usize] = NEWLINE;
        astral.sort_unstable();
        CharClasses { bmp, astral }
    }

    pub(crate) fn get() -> &'static CharClasses {
        static CLASSES: OnceLock<CharClasses> = OnceLock::new();
        CLASSES.get_or_init(CharClasses::build)
    }

    #[inline]
    pub(crate) fn class(&self, cp: u32) -> u8 {
        if cp < 0x10000 {
            self.bmp[cp as usize]
        } else {
            match self.astral.binary_search_by(|&(s, e, _)| {
                if e < cp {
                    std::cmp::Ordering::Less
                } else if s > cp {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            }) {
                Ok(i) => self.astral[i].2,
                Err(_) => OTHER,
            }
        }
    }
}

/// Splits text (already NFC) into the pieces of Qwen's pattern.
pub(crate) struct Splitter<'a> {
    s: &'a [u8],
    classes: &'static CharClasses,
}

impl<'a> Splitter<'a> {
    pub(crate) fn new(text: &'a str) -> Splitter<'a> {
        Splitter { s: text.as_bytes(), classes: CharClasses::get() }
    }

    /// Decodes the character at byte offset `i` (a char boundary, `i < len`): (code point, byte length).
    #[inline(always)]
    fn decode(&self, i: usize) -> (u32, usize) {
        let s = self.s;
        let b0 = s[i] as u32;
        if b0 < 0x80 {
            (b0, 1)
        } else if b0 < 0xE0 {
            (((b0 & 0x1F) << 6) | (s[i + 1] as u32 & 0x3F), 2)
        } else if b0 < 0xF0 {
            (((b0 & 0x0F) << 12) | ((s[i + 1] as u32 & 0x3F) << 6) | (s[i + 2] as u32 & 0x3F), 3)
        } else {
            let cp = ((b0 & 0x07) << 18)
                | ((s[i + 1] as u32 & 0x3F) << 12)
                | ((s[i + 2] as u32 & 0x3F) << 6)
                | (s[i + 3] as u32 & 0x3F);
            (cp, 4)
        }
    }

    /// (class, byte length) of the character at `i`, or None at the end.
    #[inline(always)]
    fn at(&self, i: usize) -> Option<(u8, usize)> {
        if i >= self.s.len() {
            return None;
        }
        let (cp, len) = self.decode(i);
        Some((self.classes.class(cp), len))
    }

    #[inline(always)]
    fn class_at(&self, i: usize) -> Option<u8> {
        self.at(i).map(|(c, _)| c)
    }

    /// End of the run of characters of class `class` starting at `i`.
    #[inline(always)]
    fn run(&self, mut i: usize, class: u8) -> usize {
        while let Some((c, len)) = self.at(i) {
            if c != class {
                break;
            }
            i += len;
        }
        i
    }

    /// End of the contraction (alternative 1) starting at `i` (where `s[i] == b'\''`), if any.
    #[inline]
    fn contraction(&self, i: usize) -> Option<usize> {
        let s = self.s;
        let lower = |j: usize| s.get(j).map(|b| b.to_ascii_lowercase());
        match lower(i + 1)? {
            b's' | b't' | b'm' | b'd' => Some(i + 2),
            b'r' if lower(i + 2) == Some(b'e') => Some(i + 3),
            b'v' if lower(i + 2) == Some(b'e') => Some(i + 3),
            b'l' if lower(i + 2) == Some(b'l') => Some(i + 3),
            // U+017F LATIN SMALL LETTER LONG S folds to `s`.
            0xC5 if s.get(i + 2) == Some(&0xBF) => Some(i + 3),
            _ => None,
        }
    }

    /// End (byte offset) of the piece starting at byte offset `i < len`.
    #[inline]
    pub(crate) fn next_end(&self, i: usize) -> usize {
        let s = self.s;
        if s[i] == b'\'' {
            if let Some(end) = self.contraction(i) {
                return end;
            }
        }
        let (class, len) = self.at(i).expect("i < len");
        match class {
            LETTER => return self.run(i + len, LETTER),
            NUMBER => return i + len,
            _ => {}
        }
        let next = i + len;
        let next_class = self.class_at(next);
        if class != NEWLINE && next_class == Some(LETTER) {
            return self.run(next, LETTER);
        }
        if class == OTHER || (s[i] == b' ' && next_class == Some(OTHER)) {
            let j = if class == OTHER { i } else { next };
            let j = self.run(j, OTHER);
            return self.run(j, NEWLINE);
        }
        // White space: class is SPACE or NEWLINE.
        let mut j = i;
        let mut last_newline_end = None;
        let mut last_len = 0;
        let mut count = 0usize;
        while let Some((c, len)) = self.at(j) {
            if c != SPACE && c != NEWLINE {
                break;
            }
            j += len;
            if c == NEWLINE {
                last_newline_end = Some(j);
            }
            last_len = len;
            count += 1;
        }
        if let Some(end) = last_newline_end {
            return end;
        }
        if j == s.len() || count < 2 {
            j
        } else {
            j - last_len
        }
    }

    /// Calls `f` with each piece, in order.
    #[inline]
    pub(crate) fn for_each(&self, mut f: impl FnMut(&'a [u8])) {
        let s = self.s;
        let mut i = 0;
        while i < s.len() {
            let end = self.next_end(i);
            f(&s[i..end]);
            i = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let sp = Splitter::new(text);
        let mut i = 0;
        while i < text.len() {
            let end = sp.next_end(i);
            out.push(&text[i..end]);
            i = end;
        }
        out
    }

    #[test]
    fn splits_like_the_pattern() {
        assert_eq!(pieces("Hello world"), ["Hello", " world"]);
        assert_eq!(pieces("I'm they'RE it'ſ 'x"), ["I", "'m", " they", "'RE", " it", "'ſ", " '", "x"]);
        assert_eq!(pieces("abc123"), ["abc", "1", "2", "3"]);
        assert_eq!(pieces(" (hello)!!\n\n"), [" (", "hello", ")!!\n\n"]);
        assert_eq!(pieces("a  b"), ["a", " ", " b"]);
        assert_eq!(pieces("a \n b"), ["a", " \n", " b"]);
        assert_eq!(pieces("a\t\t"), ["a", "\t\t"]);
        assert_eq!(pieces("x \t1"), ["x", " ", "\t", "1"]);
        assert_eq!(pieces("\r\n\r\nx"), ["\r\n\r\n", "x"]);
        assert_eq!(pieces("\tfoo"), ["\tfoo"]);
        assert_eq!(pieces("中文，English"), ["中文", "，English"]);
    }

    /// The case-insensitive contraction letters, as regex-syntax folds them, are exactly those handled.
    #[test]
    fn contraction_case_folding_is_complete() {
        for (letter, expect) in [
            ("s", &['S', 's', 'ſ'][..]),
            ("t", &['T', 't']),
            ("m", &['M', 'm']),
            ("d", &['D', 'd']),
            ("r", &['R', 'r']),
            ("e", &['E', 'e']),
            ("v", &['V', 'v']),
            ("l", &['L', 'l']),
        ] {
            let mut chars = Vec::new();
            for (a, b) in unicode_ranges(&format!("(?i:{letter})")) {
                chars.extend((a..=b).filter_map(char::from_u32));
            }
            chars.sort();
            let mut expect = expect.to_vec();
            expect.sort();
            assert_eq!(chars, expect, "case folding of {letter}");
        }
    }
}
