//! The idle watcher's table: a slab of watched connections, linked in keep-alive deadline
//! order.
//!
//! Built for size, as it holds every idle connection: a slot is 56 bytes and the slab is a
//! `Vec` (the unused part of its capacity is never touched, so not resident), where a
//! `HashMap` would touch every bucket of a table up to twice too large, and a `BTreeSet` of
//! deadlines would add about 50 bytes per connection. Deadlines are ticks of the watcher's
//! timer granularity; the list is kept sorted by inserting from its tail, which is O(1) in
//! practice (a connection released now has the latest deadline, keep-alive being one value
//! per listener). Removal is O(1).
//!
//! A token (the epoll user data) is the slot index and the slot's generation, bumped at each
//! removal, so an event read for a removed connection finds nothing even if its slot was
//! reused.

/// No slot.
const NIL: u32 = u32::MAX;

/// One slot: a watched connection, or a free slot.
#[derive(Debug)]
struct Slot<T> {
    /// The watched connection; `None` if free.
    value: Option<T>,
    /// Bumped when the value leaves, so old tokens stop matching.
    generation: u32,
    /// The deadline tick.
    tick: u32,
    /// Neighbours in deadline order (for a free slot, `next` is the next free slot).
    prev: u32,
    next: u32,
}

/// Watched connections by token, in deadline order.
#[derive(Debug)]
pub struct Table<T> {
    slots: Vec<Slot<T>>,
    /// First free slot.
    free: u32,
    /// Earliest and latest deadline.
    head: u32,
    tail: u32,
    len: usize,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            slots: Vec::new(),
            free: NIL,
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }
}

fn token(index: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(index)
}

impl<T> Table<T> {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Adds `value` with deadline `tick`; returns its token, and whether its deadline is now
    /// the earliest. Gives the value back if the table is full (2³² − 1 slots).
    pub fn insert(&mut self, value: T, tick: u32) -> Result<(u64, bool), T> {
        let i = if self.free != NIL {
            let i = self.free;
            self.free = self.slots[i as usize].next;
            i
        } else {
            let Some(i) = u32::try_from(self.slots.len()).ok().filter(|&i| i != NIL) else {
                return Err(value);
            };
            self.slots.push(Slot {
                value: None,
                generation: 0,
                tick: 0,
                prev: NIL,
                next: NIL,
            });
            i
        };
        // The last slot whose deadline is not later than this one: insert after it.
        let mut after = self.tail;
        while after != NIL && self.slots[after as usize].tick > tick {
            after = self.slots[after as usize].prev;
        }
        let next = if after == NIL {
            self.head
        } else {
            self.slots[after as usize].next
        };
        let s = &mut self.slots[i as usize];
        s.value = Some(value);
        s.tick = tick;
        s.prev = after;
        s.next = next;
        let generation = s.generation;
        if after == NIL {
            self.head = i;
        } else {
            self.slots[after as usize].next = i;
        }
        if next == NIL {
            self.tail = i;
        } else {
            self.slots[next as usize].prev = i;
        }
        self.len += 1;
        Ok((token(i, generation), after == NIL))
    }

    /// The slot index of a live token.
    fn index(&self, token: u64) -> Option<usize> {
        let i = (token & u64::from(u32::MAX)) as usize;
        let s = self.slots.get(i)?;
        (s.value.is_some() && u64::from(s.generation) == token >> 32).then_some(i)
    }

    /// The entry of `token`, if it is still in the table.
    pub fn get(&self, token: u64) -> Option<&T> {
        self.slots[self.index(token)?].value.as_ref()
    }

    /// Takes the entry of `token` out.
    pub fn remove(&mut self, token: u64) -> Option<T> {
        let i = self.index(token)?;
        self.take(i)
    }

    /// Unlinks slot `i` and frees it; its value (`None` only if it was free already, which
    /// callers rule out).
    fn take(&mut self, i: usize) -> Option<T> {
        self.slots[i].value.as_ref()?;
        let (prev, next) = (self.slots[i].prev, self.slots[i].next);
        if prev == NIL {
            self.head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
        let s = &mut self.slots[i];
        s.generation = s.generation.wrapping_add(1);
        s.prev = NIL;
        s.next = self.free;
        self.free = i as u32;
        self.len -= 1;
        s.value.take()
    }

    /// The earliest deadline tick.
    pub fn first_tick(&self) -> Option<u32> {
        (self.head != NIL).then(|| self.slots[self.head as usize].tick)
    }

    /// Takes out the entry with the earliest deadline if that is `now` or earlier.
    pub fn pop_due(&mut self, now: u32) -> Option<T> {
        if self.head == NIL || self.slots[self.head as usize].tick > now {
            return None;
        }
        self.take(self.head as usize)
    }

    /// Takes out every entry for which `f` is true.
    pub fn take_where(&mut self, mut f: impl FnMut(&T) -> bool) -> Vec<T> {
        let hits: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.value.as_ref().is_some_and(&mut f))
            .map(|(i, _)| i)
            .collect();
        hits.into_iter().filter_map(|i| self.take(i)).collect()
    }
}

/// The size of one slot holding a `T`.
#[cfg(test)]
pub fn slot_size<T>() -> usize {
    std::mem::size_of::<Slot<T>>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticks(t: &mut Table<u32>) -> Vec<u32> {
        let mut out = Vec::new();
        while let Some(v) = t.pop_due(u32::MAX) {
            out.push(v);
        }
        out
    }

    #[test]
    fn entries_come_out_in_deadline_order() {
        let mut t = Table::default();
        for tick in [5, 3, 9, 3, 7, 1] {
            t.insert(tick, tick).unwrap();
        }
        assert_eq!(t.first_tick(), Some(1));
        assert_eq!(ticks(&mut t), vec![1, 3, 3, 5, 7, 9]);
        assert_eq!(t.len(), 0);
        assert_eq!(t.first_tick(), None);
    }

    #[test]
    fn only_due_entries_are_popped() {
        let mut t = Table::default();
        t.insert(10, 10).unwrap();
        t.insert(20, 20).unwrap();
        assert_eq!(t.pop_due(9), None);
        assert_eq!(t.pop_due(15), Some(10));
        assert_eq!(t.pop_due(15), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn removal_unlinks_and_old_tokens_stop_matching() {
        let mut t = Table::default();
        let (a, first) = t.insert(1, 1).unwrap();
        assert!(first);
        let (b, first) = t.insert(2, 2).unwrap();
        assert!(!first);
        let (c, _) = t.insert(3, 3).unwrap();
        assert_eq!(t.remove(b), Some(2));
        assert_eq!(t.remove(b), None);
        // The slot is reused with a new generation: the old token does not reach it.
        let (d, _) = t.insert(4, 4).unwrap();
        assert_eq!(d & 0xffff_ffff, b & 0xffff_ffff);
        assert_ne!(d, b);
        assert_eq!(t.get(b), None);
        assert_eq!(t.get(d), Some(&4));
        assert_eq!(t.remove(a), Some(1));
        assert_eq!(t.first_tick(), Some(3));
        assert_eq!(t.get(c), Some(&3));
        assert_eq!(ticks(&mut t), vec![3, 4]);
    }

    #[test]
    fn take_where_takes_only_matches() {
        let mut t = Table::default();
        for v in 0..10 {
            t.insert(v, v).unwrap();
        }
        let mut odd = t.take_where(|v| v % 2 == 1);
        odd.sort_unstable();
        assert_eq!(odd, vec![1, 3, 5, 7, 9]);
        assert_eq!(ticks(&mut t), vec![0, 2, 4, 6, 8]);
    }
}
