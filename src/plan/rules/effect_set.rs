//! `EffectSet`: a transaction's distinct keys (or dependencies), all in one buffer.
//!
//! A set of `String`s cost one allocation per key when planned and one free when applied, on
//! another thread: with 5 strings per row change that was a fifth of walsweep's CPU draining
//! a backlog. Here the text of every member lives in one `String`, the table holds ranges
//! into it with their hash, and the batch union reuses those hashes instead of hashing each
//! key again.

use std::fmt;
use std::hash::BuildHasher;
use std::sync::OnceLock;

use hashbrown::HashTable;

/// One hasher for every set in the process, so a member's hash stays valid in any set. Its
/// seed is random per process: the strings come from the database, and a seed an outsider
/// cannot know keeps collisions from being chosen.
fn hash_of(member: &str) -> u64 {
    static STATE: OnceLock<foldhash::fast::RandomState> = OnceLock::new();
    STATE.get_or_init(Default::default).hash_one(member)
}

#[derive(Debug, Clone, Copy)]
struct Member {
    hash: u64,
    start: usize,
    end: usize,
}

/// Distinct strings, each stored once; iteration order is unspecified.
#[derive(Clone, Default)]
pub struct EffectSet {
    text: String,
    members: HashTable<Member>,
}

impl EffectSet {
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Bytes of member text held.
    pub(crate) fn text_len(&self) -> usize {
        self.text.len()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.members.capacity()
    }

    /// Room for `members` more members of `bytes` bytes in all.
    pub(crate) fn reserve(&mut self, members: usize, bytes: usize) {
        self.members.reserve(members, |m| m.hash);
        self.text.reserve(bytes);
    }

    /// Adds `member`; `false` if it was already there.
    pub fn insert(&mut self, member: &str) -> bool {
        self.insert_hashed(hash_of(member), member)
    }

    fn insert_hashed(&mut self, hash: u64, member: &str) -> bool {
        let text = &self.text;
        match self.members.entry(
            hash,
            |m| m.hash == hash && &text[m.start..m.end] == member,
            |m| m.hash,
        ) {
            hashbrown::hash_table::Entry::Occupied(_) => false,
            hashbrown::hash_table::Entry::Vacant(slot) => {
                let start = self.text.len();
                self.text.push_str(member);
                slot.insert(Member {
                    hash,
                    start,
                    end: self.text.len(),
                });
                true
            }
        }
    }

    pub fn contains(&self, member: &str) -> bool {
        let hash = hash_of(member);
        self.members
            .find(hash, |m| m.hash == hash && self.str_of(m) == member)
            .is_some()
    }

    fn str_of(&self, member: &Member) -> &str {
        &self.text[member.start..member.end]
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        self.members.iter().map(|m| self.str_of(m))
    }

    fn hashed(&self) -> impl Iterator<Item = (u64, &str)> + '_ {
        self.members.iter().map(|m| (m.hash, self.str_of(m)))
    }

    pub fn is_subset(&self, other: &EffectSet) -> bool {
        self.len() <= other.len()
            && self.hashed().all(|(hash, s)| {
                other
                    .members
                    .find(hash, |m| m.hash == hash && other.str_of(m) == s)
                    .is_some()
            })
    }

    /// Adds every member of `later` (taking it whole when this set is empty).
    pub(crate) fn merge(&mut self, later: EffectSet) {
        if self.is_empty() {
            *self = later;
            return;
        }
        self.reserve(later.len(), later.text.len());
        for (hash, member) in later.hashed() {
            self.insert_hashed(hash, member);
        }
    }
}

/// The distinct members of all `sets`, each once: a batch's keys or dependencies. Hashes are
/// the ones the sets stored.
pub(crate) fn union<'a>(sets: impl Iterator<Item = &'a EffectSet> + Clone) -> Vec<&'a str> {
    let mut nonempty = sets.clone().filter(|s| !s.is_empty());
    let (Some(first), None) = (nonempty.next(), nonempty.next()) else {
        let total = sets.clone().map(EffectSet::len).sum();
        let mut seen: HashTable<(u64, &str)> = HashTable::with_capacity(total);
        let mut out = Vec::with_capacity(total);
        for (hash, member) in sets.flat_map(EffectSet::hashed) {
            if let hashbrown::hash_table::Entry::Vacant(slot) =
                seen.entry(hash, |(h, s)| *h == hash && *s == member, |(h, _)| *h)
            {
                slot.insert((hash, member));
                out.push(member);
            }
        }
        return out;
    };
    first.iter().collect()
}

impl PartialEq for EffectSet {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.is_subset(other)
    }
}

impl Eq for EffectSet {}

impl fmt::Debug for EffectSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl<S: AsRef<str>> Extend<S> for EffectSet {
    fn extend<I: IntoIterator<Item = S>>(&mut self, members: I) {
        for member in members {
            self.insert(member.as_ref());
        }
    }
}

impl<S: AsRef<str>> FromIterator<S> for EffectSet {
    fn from_iter<I: IntoIterator<Item = S>>(members: I) -> Self {
        let mut set = EffectSet::default();
        set.extend(members);
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_kept_once_and_found_again() {
        let mut set = EffectSet::default();
        assert!(set.insert("item:1"));
        assert!(set.insert("item:10"));
        assert!(!set.insert("item:1"), "a repeat is not added");
        assert!(
            set.insert(""),
            "the empty string is a member like any other"
        );
        assert_eq!(set.len(), 3);
        assert_eq!(set.text_len(), "item:1item:10".len());
        assert!(set.contains("item:10") && set.contains("") && !set.contains("item:"));
        let mut members: Vec<&str> = set.iter().collect();
        members.sort_unstable();
        assert_eq!(members, ["", "item:1", "item:10"]);
    }

    #[test]
    fn sets_compare_as_sets_whatever_the_insertion_order() {
        let a: EffectSet = ["x", "y", "z"].into_iter().collect();
        let b: EffectSet = ["z", "x", "y", "x"].into_iter().collect();
        let c: EffectSet = ["x", "y"].into_iter().collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(c.is_subset(&a) && !a.is_subset(&c));
        assert_eq!(format!("{:?}", EffectSet::from_iter(["k"])), r#"{"k"}"#);
    }

    #[test]
    fn a_merge_keeps_every_member_once() {
        let mut earlier: EffectSet = ["a", "b"].into_iter().collect();
        earlier.merge(["b", "c"].into_iter().collect());
        assert_eq!(earlier, EffectSet::from_iter(["a", "b", "c"]));
        let mut empty = EffectSet::default();
        empty.merge(earlier.clone());
        assert_eq!(empty, earlier);
    }

    #[test]
    fn the_union_of_sets_lists_each_member_once() {
        let a: EffectSet = ["k1", "k2"].into_iter().collect();
        let b: EffectSet = ["k2", "k3"].into_iter().collect();
        let empty = EffectSet::default();
        let mut all = union([&a, &empty, &b].into_iter());
        all.sort_unstable();
        assert_eq!(all, ["k1", "k2", "k3"]);
        let mut one = union([&empty, &b].into_iter());
        one.sort_unstable();
        assert_eq!(one, ["k2", "k3"]);
        assert!(union([&empty].into_iter()).is_empty());
        assert!(union(std::iter::empty()).is_empty());
    }
}
