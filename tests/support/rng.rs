//! A small deterministic generator for randomised workloads, so a failing run can be replayed
//! from its seed.

pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// One of `items`, uniformly; `None` when there are none.
    pub fn pick<I: ExactSizeIterator>(&mut self, mut items: I) -> Option<I::Item> {
        if items.len() == 0 {
            return None;
        }
        let at = self.below(items.len() as u64) as usize;
        items.nth(at)
    }
}
