//! Event mode (`emit=on-change`): whether a caption says something new compared with the last
//! caption that was emitted, without a second model.
//!
//! "Differs" is a distance between the *content words* of two captions: both are case-folded,
//! split into words at every character that is not a letter or a digit (so punctuation never
//! counts), and the words that carry no scene content (articles, auxiliaries, prepositions,
//! pronouns: [`STOP_WORDS`]) are set aside. The distance is the Jaccard distance of the two
//! word sets, `1 - |A ∩ B| / |A ∪ B|`: 0 for the same words in any order or number, 1 for no
//! word in common. A caption is emitted when its distance from the last emitted one is at least
//! the threshold (`change-threshold`).
//!
//! Why 0.5 by default: a rephrasing of the same scene swaps one or two of its four to six
//! content words ("a man is walking a dog in the park" / "a man walks a dog in a park": 3 of 5
//! shared, 0.4), a new scene keeps one or none ("a woman sitting on a bench in the park": 1 of
//! 7 shared, 0.86). The trade-off either way: lower thresholds let rephrasings of one scene fire
//! events (false alarms); higher ones miss real but small changes ("a man and a woman walking a
//! dog in the park" is 0.2 from the man alone). Word forms are compared as written: "walks" and
//! "walking" are different words.

use std::collections::BTreeSet;

/// Words that say nothing about what is in the scene; a caption made only of them is compared
/// on all its words.
pub const STOP_WORDS: &[&str] = &[
    "a", "an", "the", "is", "are", "was", "were", "be", "been", "being", "am", "has", "have",
    "had", "do", "does", "did", "of", "in", "on", "at", "to", "into", "onto", "from", "by", "with",
    "for", "as", "and", "or", "but", "it", "its", "this", "that", "these", "those", "there",
    "here", "some", "he", "she", "his", "her", "they", "them", "their", "we", "you", "i", "while",
    "which", "who",
];

/// The content words of `text`: case-folded words (runs of letters and digits), stop words
/// left out unless nothing else is left.
pub fn content_words(text: &str) -> BTreeSet<String> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let content: BTreeSet<String> = words
        .iter()
        .filter(|w| !STOP_WORDS.contains(&w.as_str()))
        .cloned()
        .collect();
    if content.is_empty() {
        words.into_iter().collect()
    } else {
        content
    }
}

/// Jaccard distance of two word sets; two empty sets are equal (0).
pub fn word_distance(a: &BTreeSet<String>, b: &BTreeSet<String>) -> f64 {
    let union = a.union(b).count();
    if union == 0 {
        return 0.0;
    }
    let shared = a.intersection(b).count();
    1.0 - shared as f64 / union as f64
}

/// The distance between two captions' content words, in [0, 1].
pub fn caption_distance(a: &str, b: &str) -> f64 {
    word_distance(&content_words(a), &content_words(b))
}

/// What to do with a caption.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Emit it; `distance` from the last emitted caption (1 for the first one).
    Emit { distance: f64 },
    /// Nothing new: suppress it.
    Suppress { distance: f64 },
}

impl Verdict {
    pub fn emits(self) -> bool {
        matches!(self, Verdict::Emit { .. })
    }
}

/// The last emitted caption of one stream and the rule that lets the next one through.
#[derive(Debug, Clone, Default)]
pub struct ChangeFilter {
    /// Content words of the last emitted caption; `None` until one is emitted.
    last_emitted: Option<BTreeSet<String>>,
}

impl ChangeFilter {
    /// Forgets the last emitted caption (a new stream, a flush): the next caption is emitted.
    pub fn reset(&mut self) {
        self.last_emitted = None;
    }

    /// Decides on `text`. With `on_change` false every caption is emitted (and remembered, so
    /// that switching to on-change compares with what went out last); with it, a caption at
    /// least `threshold` away from the last emitted one is emitted: threshold 0 emits all.
    pub fn judge(&mut self, text: &str, on_change: bool, threshold: f64) -> Verdict {
        let words = content_words(text);
        let distance = self
            .last_emitted
            .as_ref()
            .map_or(1.0, |last| word_distance(last, &words));
        if !on_change || distance >= threshold {
            self.last_emitted = Some(words);
            Verdict::Emit { distance }
        } else {
            Verdict::Suppress { distance }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        content_words(text).into_iter().collect()
    }

    #[test]
    fn words_are_case_folded_without_punctuation_or_stop_words() {
        assert_eq!(
            words("A Man, walking his DOG in the park!"),
            ["dog", "man", "park", "walking"]
        );
        assert_eq!(words("Ça va? 2 cats."), ["2", "cats", "va", "ça"]);
        // Only stop words: compared on all of them.
        assert_eq!(words("It is."), ["is", "it"]);
        assert!(words(" ... ").is_empty());
    }

    #[test]
    fn distance_is_jaccard_of_content_words() {
        assert_eq!(caption_distance("A dog.", "the DOG"), 0.0);
        assert_eq!(caption_distance("dog cat", "cat dog dog"), 0.0);
        assert_eq!(caption_distance("dog", "cat"), 1.0);
        assert_eq!(caption_distance("", ""), 0.0);
        assert_eq!(caption_distance("", "dog"), 1.0);
        // The examples of the module's documentation (and of the README).
        let walking = "A man is walking a dog in the park.";
        let rephrased = "A man walks a dog in a park.";
        assert!((caption_distance(walking, rephrased) - 0.4).abs() < 1e-12);
        let bench = "A woman sitting on a bench in the park.";
        assert!((caption_distance(walking, bench) - 6.0 / 7.0).abs() < 1e-12);
        let both = "A man and a woman walking a dog in the park.";
        assert!((caption_distance(walking, both) - 0.2).abs() < 1e-12);
        // Symmetric.
        assert_eq!(
            caption_distance(walking, bench),
            caption_distance(bench, walking)
        );
    }

    #[test]
    fn on_change_compares_with_the_last_emitted_caption_not_the_last_seen() {
        let mut filter = ChangeFilter::default();
        assert_eq!(
            filter.judge("a red ball", true, 0.5),
            Verdict::Emit { distance: 1.0 }
        );
        assert!(!filter.judge("a red ball.", true, 0.5).emits());
        // 1 of 3 shared with "red ball": suppressed at 0.7...
        assert!(!filter.judge("a red cube", true, 0.7).emits());
        // ...and drifting on does not move the reference: "red cube" again is still 2/3 away
        // from "red ball" rather than 0 from the suppressed "red cube".
        let v = filter.judge("red cube", true, 0.5);
        assert!(v.emits(), "{v:?}");
        // Now the reference is "red cube".
        assert!(!filter.judge("the red cube", true, 0.5).emits());
    }

    #[test]
    fn threshold_zero_and_always_emit_everything() {
        let mut filter = ChangeFilter::default();
        for _ in 0..3 {
            assert!(filter.judge("same", true, 0.0).emits());
        }
        for _ in 0..3 {
            assert!(filter.judge("same", false, 0.9).emits());
        }
        // Always still remembers what went out: on-change then compares with it.
        assert!(!filter.judge("same", true, 0.5).emits());
        filter.reset();
        assert!(filter.judge("same", true, 0.5).emits());
    }
}
