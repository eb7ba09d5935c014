//! A Wing–Gong–Lowe linearizability search, generic over a sequential [`Model`].
//!
//! The search is a depth-first walk over configurations (the set of operations
//! linearized so far, the model state). From a configuration, an operation may be
//! linearized next when it was invoked before every not-yet-linearized completed
//! operation returned (real-time order), and, if its result is known, the model
//! gives that result. A configuration seen before is not explored again (Lowe's
//! memoization), which keeps histories with limited concurrency tractable.
//!
//! Two reductions keep the search small, both sound:
//! - an operation whose result shows it changes nothing in any state
//!   ([`Model::read_only`]: a read, a refusal) is linearized as soon as it fits: moving
//!   it earlier changes no state and only lifts its own real-time constraint on others.
//!   (A no-op that could change another state, like joining twice, is not moved: at
//!   its later place it might not be a no-op);
//! - an indeterminate operation (no known result) is tried only where it changes the
//!   state (linearizing it as a no-op is the same as never linearizing it), and only
//!   when the operation placed right after it does not commute with it (placing it
//!   after that operation is explored too);
//! - a configuration is also skipped when one with the same completed operations and
//!   state, but fewer indeterminate operations used, was seen: having more of them
//!   left can only help.
//!
//! Indeterminate operations may be linearized anywhere after their invoke, or never;
//! the search succeeds once every completed operation is linearized.
//!
//! To stay correct: [`Model::step`] must be a pure function of the state and the
//! operation, and equal states must behave equally (the memo relies on `Eq + Hash`).

use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;

/// A sequential specification.
pub trait Model: Clone + Eq + Hash + Debug {
    type Op: Debug;
    type Ret: PartialEq + Debug;
    /// The state after `op` and what `op` returns.
    fn step(&self, op: &Self::Op) -> (Self, Self::Ret);

    /// True when `op` returning `ret` leaves every state unchanged (reads, refusals).
    /// Answering `false` is always safe; `true` lets the search place it eagerly.
    fn read_only(_op: &Self::Op, _ret: &Self::Ret) -> bool {
        false
    }
}

/// One operation of a concurrent history.
#[derive(Debug, Clone)]
pub struct Entry<M: Model> {
    pub op: M::Op,
    /// `None`: indeterminate; it may take effect any time after `invoke`, or never.
    pub ret: Option<M::Ret>,
    /// Real-time position of the invoke (e.g. the history index).
    pub invoke: u64,
    /// Real-time position of the completion; ignored when `ret` is `None`.
    pub complete: u64,
}

/// What the search concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A witness: entry indexes in linearization order (indeterminate ones that never
    /// took effect are left out).
    Linearizable(Vec<usize>),
    /// No order fits. At the deepest point the search reached, `linearized` completed
    /// operations were placed, `blocking` (the entry with the earliest completion not
    /// yet placed) could not be, and the model state was `state`.
    NotLinearizable(Stuck),
    /// The step budget ran out first.
    Undecided(Stuck),
}

/// Where the search got furthest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stuck {
    pub linearized: usize,
    pub blocking: Option<usize>,
    /// Entries that could have been placed there (none fit, or all led nowhere).
    pub candidates: Vec<usize>,
    pub state: String,
}

/// The answer and how much work it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Searched {
    pub answer: Answer,
    pub steps: u64,
    pub configurations: usize,
}

struct Frame<M> {
    state: M,
    /// Positions linearized on entering this frame (the chosen one, then the greedy ones).
    undo: Vec<usize>,
    cands: Vec<usize>,
    next: usize,
    lo_c: usize,
    lo_r: usize,
}

/// (first word of the linearized completed set that is not all ones, the words from
/// there to the last non-zero one, the state, the indeterminate op that must be
/// followed by an op that does not commute with it).
type Key<M> = (u32, Box<[u64]>, M, Option<u32>);

struct Search<'a, M: Model> {
    entries: &'a [Entry<M>],
    /// Entry index by position; positions are in invoke order.
    order: Vec<usize>,
    inv: Vec<u64>,
    /// Completion by position; `u64::MAX` for indeterminate entries.
    ret_at: Vec<u64>,
    /// Positions of completed entries, in invoke order.
    comp: Vec<usize>,
    /// Positions of completed entries, in completion order.
    by_ret: Vec<usize>,
    /// Positions of indeterminate entries.
    pend: Vec<usize>,
    bits: Vec<u64>,
    done: usize,
    /// Seen configurations: per key, the sets of indeterminate positions used.
    memo: HashMap<Key<M>, Vec<Box<[u32]>>>,
    configurations: usize,
    /// Bits of indeterminate positions.
    pend_mask: Vec<u64>,
    deepest: Option<Stuck>,
}

enum Entered<M> {
    Done(Vec<usize>),
    Dead(Vec<usize>),
    Frame(Frame<M>),
}

impl<'a, M: Model> Search<'a, M> {
    fn new(entries: &'a [Entry<M>]) -> Self {
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by_key(|&i| (entries[i].invoke, i));
        let inv: Vec<u64> = order.iter().map(|&i| entries[i].invoke).collect();
        let ret_at: Vec<u64> = order
            .iter()
            .map(|&i| {
                if entries[i].ret.is_some() {
                    entries[i].complete
                } else {
                    u64::MAX
                }
            })
            .collect();
        let comp: Vec<usize> = (0..order.len())
            .filter(|&p| entries[order[p]].ret.is_some())
            .collect();
        let pend: Vec<usize> = (0..order.len())
            .filter(|&p| entries[order[p]].ret.is_none())
            .collect();
        let mut pend_mask = vec![0u64; entries.len().div_ceil(64)];
        for &p in &pend {
            pend_mask[p / 64] |= 1 << (p % 64);
        }
        let mut by_ret = comp.clone();
        by_ret.sort_by_key(|&p| (ret_at[p], p));
        Search {
            entries,
            order,
            inv,
            ret_at,
            comp,
            by_ret,
            pend,
            bits: vec![0; entries.len().div_ceil(64)],
            done: 0,
            memo: HashMap::new(),
            configurations: 0,
            pend_mask,
            deepest: None,
        }
    }

    fn is_lin(&self, p: usize) -> bool {
        self.bits[p / 64] & (1 << (p % 64)) != 0
    }

    fn set(&mut self, p: usize, on: bool) {
        if on {
            self.bits[p / 64] |= 1 << (p % 64);
        } else {
            self.bits[p / 64] &= !(1 << (p % 64));
        }
        if self.ret_at[p] != u64::MAX {
            if on {
                self.done += 1;
            } else {
                self.done -= 1;
            }
        }
    }

    fn op(&self, p: usize) -> &'a Entry<M> {
        &self.entries[self.order[p]]
    }

    fn key(&self, state: &M, after: Option<usize>) -> Key<M> {
        // Indeterminate positions count as linearized here: they are kept apart.
        let words: Vec<u64> = self
            .bits
            .iter()
            .zip(&self.pend_mask)
            .map(|(b, m)| b | m)
            .collect();
        let start = words
            .iter()
            .position(|w| *w != u64::MAX)
            .unwrap_or(words.len());
        let end = self
            .bits
            .iter()
            .zip(&self.pend_mask)
            .rposition(|(b, m)| b & !m != 0)
            .map_or(start, |e| (e + 1).max(start));
        (
            start as u32,
            words[start..end].into(),
            state.clone(),
            after.map(|p| p as u32),
        )
    }

    /// Records a configuration; false if it, or one that dominates it, was seen.
    fn remember(&mut self, state: &M, after: Option<usize>) -> bool {
        let used: Box<[u32]> = self
            .pend
            .iter()
            .filter(|&&p| self.is_lin(p))
            .map(|&p| p as u32)
            .collect();
        let key = self.key(state, after);
        let seen = self.memo.entry(key).or_default();
        let subset =
            |small: &[u32], big: &[u32]| small.iter().all(|x| big.binary_search(x).is_ok());
        if seen.iter().any(|s| subset(s, &used)) {
            return false;
        }
        seen.retain(|s| !subset(&used, s));
        seen.push(used);
        self.configurations += 1;
        true
    }

    /// Linearizes everything that fits without changing `state`, then lists the
    /// candidates that do change it.
    /// True when `b` may come right after the indeterminate `p` (placed from `before`
    /// to reach `state`): `b` does not commute with `p` there, or both are
    /// indeterminate and in position order.
    fn may_follow(&self, p: usize, before: &M, state: &M, b: usize) -> bool {
        let (pe, be) = (self.op(p), self.op(b));
        let (without, got) = before.step(&be.op);
        if be.ret.is_some() && be.ret.as_ref() != Some(&got) {
            return true;
        }
        if without.step(&pe.op).0 != state.step(&be.op).0 {
            return true;
        }
        be.ret.is_none() && b > p
    }

    /// Linearizes everything that fits without changing `state`, then lists the
    /// candidates that do change it. `after`: the indeterminate op just placed and the
    /// state before it; the next op must not commute with it (any order of commuting
    /// ops is explored from the parent, with the indeterminate one later).
    fn enter(
        &mut self,
        state: M,
        mut undo: Vec<usize>,
        mut lo_c: usize,
        mut lo_r: usize,
        mut after: Option<(usize, M)>,
    ) -> Entered<M> {
        let mut cands = Vec::new();
        // Each round linearizes one more position, so at most `len + 1` rounds.
        for _round in 0..=self.order.len() {
            while lo_c < self.comp.len() && self.is_lin(self.comp[lo_c]) {
                lo_c += 1;
            }
            while lo_r < self.by_ret.len() && self.is_lin(self.by_ret[lo_r]) {
                lo_r += 1;
            }
            if self.done == self.comp.len() {
                return Entered::Done(undo);
            }
            let min_ret = self.by_ret.get(lo_r).map_or(u64::MAX, |&p| self.ret_at[p]);
            cands.clear();
            let mut greedy = None;
            for &q in &self.comp[lo_c..] {
                if self.inv[q] >= min_ret {
                    break;
                }
                if self.is_lin(q) {
                    continue;
                }
                let e = self.op(q);
                let (next, got) = state.step(&e.op);
                if e.ret.as_ref() != Some(&got) {
                    continue;
                }
                if let Some((p, before)) = &after {
                    if !self.may_follow(*p, before, &state, q) {
                        continue;
                    }
                }
                if M::read_only(&e.op, &got) && next == state {
                    greedy = Some(q);
                    break;
                }
                cands.push(q);
            }
            if let Some(q) = greedy {
                self.set(q, true);
                undo.push(q);
                after = None;
                continue;
            }
            // Latest first: an indeterminate op that took effect is usually observed
            // soon after its invoke.
            let definite = cands.len();
            for &q in self.pend.iter().rev() {
                if self.is_lin(q) || self.inv[q] >= min_ret {
                    continue;
                }
                if state.step(&self.op(q).op).0 == state {
                    continue;
                }
                if let Some((p, before)) = &after {
                    if !self.may_follow(*p, before, &state, q) {
                        continue;
                    }
                }
                cands.push(q);
            }
            // Indeterminate ones first: each must be followed by an op that depends on
            // it, so a wrong guess dies at once, while one that took effect is placed
            // before the search runs deep without it.
            cands.rotate_left(definite);
            break;
        }
        if self
            .deepest
            .as_ref()
            .is_none_or(|d| self.done > d.linearized)
        {
            self.deepest = Some(Stuck {
                linearized: self.done,
                blocking: self.by_ret.get(lo_r).map(|&p| self.order[p]),
                candidates: cands.iter().map(|&p| self.order[p]).collect(),
                state: format!("{state:?}"),
            });
        }
        if !self.remember(&state, after.map(|(p, _)| p)) {
            return Entered::Dead(undo);
        }
        Entered::Frame(Frame {
            state,
            undo,
            cands,
            next: 0,
            lo_c,
            lo_r,
        })
    }
}

/// Searches for a linearization of `entries` from `init`, visiting at most `budget`
/// configurations.
pub fn search<M: Model>(init: &M, entries: &[Entry<M>], budget: u64) -> Searched {
    let mut s = Search::new(entries);
    let mut stack: Vec<Frame<M>> = Vec::new();
    let mut steps: u64 = 1;
    let finish = |stack: &[Frame<M>], last: Vec<usize>, order: &[usize]| -> Vec<usize> {
        stack
            .iter()
            .flat_map(|f| f.undo.iter().copied())
            .chain(last)
            .map(|p| order[p])
            .collect()
    };
    match s.enter(init.clone(), Vec::new(), 0, 0, None) {
        Entered::Done(undo) => {
            return Searched {
                answer: Answer::Linearizable(finish(&stack, undo, &s.order)),
                steps,
                configurations: s.configurations,
            }
        }
        Entered::Dead(_) => {}
        Entered::Frame(f) => stack.push(f),
    }
    // Every iteration either pushes a new, never seen configuration (at most `budget`
    // of them) or pops one, so this ends.
    let stuck = loop {
        let Some(top) = stack.last_mut() else {
            break None;
        };
        if top.next >= top.cands.len() {
            if let Some(f) = stack.pop() {
                for &p in &f.undo {
                    s.set(p, false);
                }
            }
            continue;
        }
        let p = top.cands[top.next];
        top.next += 1;
        let (lo_c, lo_r) = (top.lo_c, top.lo_r);
        let next = top.state.step(&s.op(p).op).0;
        let after = s.op(p).ret.is_none().then(|| (p, top.state.clone()));
        if steps >= budget {
            break Some(());
        }
        steps += 1;
        s.set(p, true);
        match s.enter(next, vec![p], lo_c, lo_r, after) {
            Entered::Done(undo) => {
                return Searched {
                    answer: Answer::Linearizable(finish(&stack, undo, &s.order)),
                    steps,
                    configurations: s.configurations,
                }
            }
            Entered::Dead(undo) => {
                for &q in &undo {
                    s.set(q, false);
                }
            }
            Entered::Frame(f) => stack.push(f),
        }
    };
    let deepest = s.deepest.clone().unwrap_or_default();
    Searched {
        answer: if stuck.is_some() {
            Answer::Undecided(deepest)
        } else {
            Answer::NotLinearizable(deepest)
        },
        steps,
        configurations: s.configurations,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use stateright::semantics::register::{Register, RegisterOp, RegisterRet};
    use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};

    /// A register of small integers, the same semantics as stateright's `Register`.
    #[derive(Debug, Clone, PartialEq, Eq, Hash)]
    pub struct Reg(pub u8);

    impl Model for Reg {
        type Op = RegisterOp<u8>;
        type Ret = RegisterRet<u8>;
        fn step(&self, op: &Self::Op) -> (Self, Self::Ret) {
            match op {
                RegisterOp::Write(v) => (Reg(*v), RegisterRet::WriteOk),
                RegisterOp::Read => (self.clone(), RegisterRet::ReadOk(self.0)),
            }
        }
        fn read_only(op: &Self::Op, _: &Self::Ret) -> bool {
            *op == RegisterOp::Read
        }
    }

    fn e<M: Model>(op: M::Op, ret: Option<M::Ret>, invoke: u64, complete: u64) -> Entry<M> {
        Entry {
            op,
            ret,
            invoke,
            complete,
        }
    }

    #[test]
    fn sequential_register_history_is_linearizable() {
        let h: Vec<Entry<Reg>> = vec![
            e(RegisterOp::Write(1), Some(RegisterRet::WriteOk), 0, 1),
            e(RegisterOp::Read, Some(RegisterRet::ReadOk(1)), 2, 3),
        ];
        let s = search(&Reg(0), &h, 1000);
        assert_eq!(s.answer, Answer::Linearizable(vec![0, 1]));
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_not() {
        let h: Vec<Entry<Reg>> = vec![
            e(RegisterOp::Write(1), Some(RegisterRet::WriteOk), 0, 1),
            e(RegisterOp::Read, Some(RegisterRet::ReadOk(0)), 2, 3),
        ];
        let s = search(&Reg(0), &h, 1000);
        let Answer::NotLinearizable(stuck) = s.answer else {
            panic!("{s:?}")
        };
        assert_eq!(stuck.blocking, Some(1));
    }

    #[test]
    fn concurrent_ops_may_take_either_order_and_indeterminate_ones_may_vanish() {
        let h: Vec<Entry<Reg>> = vec![
            e(RegisterOp::Write(1), Some(RegisterRet::WriteOk), 0, 3),
            e(RegisterOp::Read, Some(RegisterRet::ReadOk(0)), 1, 2),
            e(RegisterOp::Write(7), None, 4, 0),
            e(RegisterOp::Read, Some(RegisterRet::ReadOk(1)), 5, 6),
        ];
        assert!(matches!(
            search(&Reg(0), &h, 1000).answer,
            Answer::Linearizable(_)
        ));
        let h2: Vec<Entry<Reg>> = vec![
            e(RegisterOp::Write(7), None, 0, 0),
            e(RegisterOp::Read, Some(RegisterRet::ReadOk(7)), 5, 6),
            e(RegisterOp::Read, Some(RegisterRet::ReadOk(0)), 7, 8),
        ];
        assert!(matches!(
            search(&Reg(0), &h2, 1000).answer,
            Answer::NotLinearizable(_)
        ));
    }

    #[test]
    fn a_tiny_budget_is_undecided() {
        let h: Vec<Entry<Reg>> = (0..6)
            .map(|i| e(RegisterOp::Write(i), Some(RegisterRet::WriteOk), 0, 100))
            .chain([e(RegisterOp::Read, Some(RegisterRet::ReadOk(9)), 101, 102)])
            .collect();
        assert!(matches!(
            search(&Reg(0), &h, 5).answer,
            Answer::Undecided(_)
        ));
        assert!(matches!(
            search(&Reg(0), &h, 100_000).answer,
            Answer::NotLinearizable(_)
        ));
    }

    /// A random concurrent history of `procs` processes and at most `ops` operations,
    /// as (process, op, ret) events: `Some` op = invoke, `None` op = return. Results
    /// come from a real register applied at a random point of each call, then
    /// sometimes corrupted; a process's last call may stay open (indeterminate).
    pub(crate) enum Ev<O, R> {
        Invoke(usize, O),
        Return(usize, R),
    }

    /// Drives a random schedule; `exec` gives the true result at the linearization
    /// point, `corrupt` a wrong one.
    pub(crate) fn random_history<S, O: Clone, R: Clone>(
        rng: &mut StdRng,
        real: &mut S,
        procs: usize,
        ops: usize,
        gen_op: &mut dyn FnMut(&mut StdRng) -> O,
        exec: &dyn Fn(&mut S, &O) -> R,
        corrupt: &mut dyn FnMut(&mut StdRng, &R) -> R,
    ) -> Vec<Ev<O, R>> {
        // Per process: open call (op, its result once applied).
        let mut open: Vec<Option<(O, Option<R>)>> = vec![None; procs];
        let mut retired = vec![false; procs];
        let mut issued = 0;
        let mut out = Vec::new();
        for _ in 0..(ops * 4 + 8) {
            let p = rng.gen_range(0..procs);
            if retired[p] {
                continue;
            }
            match open[p].take() {
                None if issued < ops => {
                    let op = gen_op(rng);
                    issued += 1;
                    out.push(Ev::Invoke(p, op.clone()));
                    open[p] = Some((op, None));
                }
                None => {}
                Some((op, None)) => {
                    // Take effect now.
                    let r = exec(real, &op);
                    open[p] = Some((op, Some(r)));
                }
                Some((_, Some(r))) => {
                    let r = if rng.gen_bool(0.15) {
                        corrupt(rng, &r)
                    } else {
                        r
                    };
                    if rng.gen_bool(0.1) {
                        // Leave it open: indeterminate, and the process stops.
                        retired[p] = true;
                    } else {
                        out.push(Ev::Return(p, r));
                    }
                }
            }
        }
        // Calls still open at the end stay indeterminate.
        out
    }

    /// Turns events into WGL entries and a stateright tester; returns both verdicts.
    pub(crate) fn both_verdicts<M, S>(init: &M, spec: S, evs: &[Ev<M::Op, M::Ret>]) -> (bool, bool)
    where
        M: Model,
        M::Op: Clone,
        M::Ret: Clone,
        S: SequentialSpec<Op = M::Op, Ret = M::Ret> + Clone,
    {
        let mut entries: Vec<Entry<M>> = Vec::new();
        let mut open: std::collections::BTreeMap<usize, usize> = Default::default();
        let mut tester = LinearizabilityTester::new(spec);
        for (t, ev) in evs.iter().enumerate() {
            match ev {
                Ev::Invoke(p, op) => {
                    open.insert(*p, entries.len());
                    entries.push(e(op.clone(), None, t as u64, 0));
                    tester.on_invoke(*p, op.clone()).unwrap();
                }
                Ev::Return(p, r) => {
                    let i = open.remove(p).unwrap();
                    entries[i].ret = Some(r.clone());
                    entries[i].complete = t as u64;
                    tester.on_return(*p, r.clone()).unwrap();
                }
            }
        }
        let ours = matches!(
            search(init, &entries, 1_000_000).answer,
            Answer::Linearizable(_)
        );
        (ours, tester.is_consistent())
    }

    #[test]
    fn agrees_with_stateright_on_random_register_histories() {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let (mut yes, mut no) = (0, 0);
        for _ in 0..3000 {
            let procs = rng.gen_range(1..=3);
            let n = rng.gen_range(1..=8);
            let mut real = 0u8;
            let evs = random_history(
                &mut rng,
                &mut real,
                procs,
                n,
                &mut |r: &mut StdRng| {
                    if r.gen_bool(0.5) {
                        RegisterOp::Write(r.gen_range(1..4))
                    } else {
                        RegisterOp::Read
                    }
                },
                &|s: &mut u8, op: &RegisterOp<u8>| match op {
                    RegisterOp::Write(v) => {
                        *s = *v;
                        RegisterRet::WriteOk
                    }
                    RegisterOp::Read => RegisterRet::ReadOk(*s),
                },
                &mut |r: &mut StdRng, ret: &RegisterRet<u8>| match ret {
                    RegisterRet::ReadOk(_) => RegisterRet::ReadOk(r.gen_range(0..4)),
                    RegisterRet::WriteOk => RegisterRet::WriteOk,
                },
            );
            let (ours, theirs) = both_verdicts(&Reg(0), Register(0u8), &evs);
            assert_eq!(ours, theirs);
            if ours {
                yes += 1;
            } else {
                no += 1;
            }
        }
        // The generator must exercise both answers.
        assert!(yes > 300 && no > 300, "yes {yes}, no {no}");
    }
}
