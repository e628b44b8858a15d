//! Random sequences of transfers, reservations, posts, voids and expiries, run
//! against the real store and against a deliberately simple in-memory model.
//! After every step the answers, every balance and the ledger's own
//! verification must agree.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use payrail_core::{
    AccountFlags, AccountId, Balances, Currency, LedgerError, Money, TransferId, TransferOp,
    TransferRequest,
};
use payrail_store::ledger::{self, LedgerOpError};
use payrail_store::{StoreError, sandbox};
use proptest::prelude::*;

const ACCOUNTS: usize = 4; // 0 issues money (may go negative); 1..=3 never negative

#[derive(Clone, Debug)]
enum Op {
    Single {
        d: usize,
        c: usize,
        amount: i64,
        key: u8,
    },
    Reserve {
        d: usize,
        c: usize,
        amount: i64,
        timeout_s: Option<u64>,
        key: u8,
    },
    Post {
        p: usize,
        amount: i64,
        key: u8,
    },
    Void {
        p: usize,
        key: u8,
    },
    /// Moves the sandbox clock, folds account deltas and runs the expiry sweep.
    Advance {
        s: u64,
    },
    /// A single transfer of exactly the debit account's available amount plus
    /// `delta` (-1, 0 or 1): the never-negative boundary, hit on purpose.
    Exact {
        d: usize,
        c: usize,
        delta: i64,
        key: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let acct = 0..ACCOUNTS;
    let amount = 1i64..5_000;
    let key = 0u8..24; // a small pool: replays and conflicts happen often
    prop_oneof![
        4 => (acct.clone(), acct.clone(), amount.clone(), key.clone())
            .prop_map(|(d, c, amount, key)| Op::Single { d, c, amount, key }),
        3 => (acct.clone(), acct, amount.clone(), proptest::option::of(prop_oneof![Just(10u64), Just(60), Just(600)]), key.clone())
            .prop_map(|(d, c, amount, timeout_s, key)| Op::Reserve { d, c, amount, timeout_s, key }),
        2 => (0usize..8, amount, key.clone()).prop_map(|(p, amount, key)| Op::Post { p, amount, key }),
        1 => (0usize..8, key).prop_map(|(p, key)| Op::Void { p, key }),
        1 => prop_oneof![Just(0u64), Just(30), Just(120), Just(900)].prop_map(|s| Op::Advance { s }),
        2 => (1..ACCOUNTS, 0..ACCOUNTS, -1i64..=1, 0u8..24)
            .prop_map(|(d, c, delta, key)| Op::Exact { d, c, delta, key }),
    ]
}

/// What an operation is expected to answer, coarsely.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Answer {
    Done { replayed: bool },
    Refused(&'static str),
}

fn refusal(e: &LedgerError) -> &'static str {
    match e {
        LedgerError::Invalid(_) => "invalid",
        LedgerError::AccountNotFound => "account-not-found",
        LedgerError::InsufficientFunds(_) => "insufficient",
        LedgerError::TotalOverflow(_) => "overflow",
        LedgerError::IdempotencyConflict { .. } => "conflict",
        LedgerError::PendingNotFound => "pending-not-found",
        LedgerError::NotPending(_) => "not-pending",
        LedgerError::AlreadyPosted => "already-posted",
        LedgerError::AlreadyVoided => "already-voided",
        LedgerError::PendingExpired => "expired",
        LedgerError::ExceedsPending => "exceeds",
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Recorded {
    Single {
        d: usize,
        c: usize,
        amount: i64,
    },
    Reserve {
        d: usize,
        c: usize,
        amount: i64,
        timeout_s: Option<u64>,
    },
    Post {
        p: usize,
        amount: i64,
    },
    Void {
        p: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
enum PState {
    Open,
    Done(&'static str),
}

struct Pending {
    d: usize,
    c: usize,
    amount: i64,
    expires_at: Option<i64>,
    state: PState,
}

/// The model: plain arithmetic on four numbers per account.
struct Model {
    balances: [Balances; ACCOUNTS],
    keys: HashMap<u8, Recorded>,
    pendings: Vec<Pending>,
    now: i64,
    flaw: Flaw,
}

/// A mistake planted in the model, to show that the comparison catches it.
#[derive(Clone, Copy, PartialEq)]
enum Flaw {
    None,
    /// Lets a never-negative account overdraw: the answers differ.
    Overdraws,
    /// Credits a transfer's amount twice: only the balances differ.
    CreditsTwice,
}

impl Model {
    fn new() -> Model {
        Model::with(Flaw::None)
    }

    fn with(flaw: Flaw) -> Model {
        Model {
            balances: [Balances::default(); ACCOUNTS],
            keys: HashMap::new(),
            pendings: Vec::new(),
            now: 0,
            flaw,
        }
    }

    fn available(&self, a: usize) -> i64 {
        let b = &self.balances[a];
        b.credits_posted - b.debits_posted - b.debits_pending
    }

    fn flagged(a: usize) -> bool {
        a != 0
    }

    fn replay(&self, key: u8, wanted: &Recorded) -> Option<Answer> {
        self.keys.get(&key).map(|r| {
            if r == wanted {
                Answer::Done { replayed: true }
            } else {
                Answer::Refused("conflict")
            }
        })
    }

    /// `p` names a reservation by creation order; one past the end names a
    /// transfer id that does not exist.
    fn apply(&mut self, op: &Op) -> Answer {
        match *op {
            Op::Single { d, c, amount, key } => {
                if d == c {
                    return Answer::Refused("invalid");
                }
                let rec = Recorded::Single { d, c, amount };
                if let Some(a) = self.replay(key, &rec) {
                    return a;
                }
                if Self::flagged(d) && self.available(d) < amount && self.flaw != Flaw::Overdraws {
                    return Answer::Refused("insufficient");
                }
                self.balances[d].debits_posted += amount;
                self.balances[c].credits_posted += amount;
                if self.flaw == Flaw::CreditsTwice {
                    self.balances[c].credits_posted += amount;
                }
                self.keys.insert(key, rec);
                Answer::Done { replayed: false }
            }
            Op::Reserve {
                d,
                c,
                amount,
                timeout_s,
                key,
            } => {
                if d == c {
                    return Answer::Refused("invalid");
                }
                let rec = Recorded::Reserve {
                    d,
                    c,
                    amount,
                    timeout_s,
                };
                if let Some(a) = self.replay(key, &rec) {
                    return a;
                }
                if Self::flagged(d) && self.available(d) < amount {
                    return Answer::Refused("insufficient");
                }
                self.balances[d].debits_pending += amount;
                self.balances[c].credits_pending += amount;
                self.pendings.push(Pending {
                    d,
                    c,
                    amount,
                    expires_at: timeout_s.map(|s| self.now + s as i64 * 1000),
                    state: PState::Open,
                });
                self.keys.insert(key, rec);
                Answer::Done { replayed: false }
            }
            Op::Post { p, amount, key } => self.resolve(p, Some(amount), key),
            Op::Exact { .. } => unreachable!("resolved to a Single before it is applied"),
            Op::Void { p, key } => self.resolve(p, None, key),
            Op::Advance { s } => {
                self.now += s as i64 * 1000;
                for i in 0..self.pendings.len() {
                    let p = &self.pendings[i];
                    if p.state == PState::Open && p.expires_at.is_some_and(|t| t <= self.now) {
                        let (d, c, amount) = (p.d, p.c, p.amount);
                        self.balances[d].debits_pending -= amount;
                        self.balances[c].credits_pending -= amount;
                        self.pendings[i].state = PState::Done("expired");
                    }
                }
                Answer::Done { replayed: false }
            }
        }
    }

    fn resolve(&mut self, p: usize, amount: Option<i64>, key: u8) -> Answer {
        let p = p % (self.pendings.len() + 1);
        let rec = match amount {
            Some(amount) => Recorded::Post { p, amount },
            None => Recorded::Void { p },
        };
        if let Some(a) = self.replay(key, &rec) {
            return a;
        }
        let Some(pending) = self.pendings.get(p) else {
            return Answer::Refused("pending-not-found");
        };
        match pending.state {
            PState::Done("posted") => return Answer::Refused("already-posted"),
            PState::Done("voided") => return Answer::Refused("already-voided"),
            PState::Done(_) => return Answer::Refused("expired"),
            PState::Open => {}
        }
        if pending.expires_at.is_some_and(|t| t <= self.now) {
            return Answer::Refused("expired");
        }
        if amount.is_some_and(|a| a > pending.amount) {
            return Answer::Refused("exceeds");
        }
        let (d, c, reserved) = (pending.d, pending.c, pending.amount);
        self.balances[d].debits_pending -= reserved;
        self.balances[c].credits_pending -= reserved;
        if let Some(a) = amount {
            self.balances[d].debits_posted += a;
            self.balances[c].credits_posted += a;
        }
        self.pendings[p].state = PState::Done(if amount.is_some() { "posted" } else { "voided" });
        self.keys.insert(key, rec);
        Answer::Done { replayed: false }
    }
}

fn run_case(ops: Vec<Op>) -> Result<(), TestCaseError> {
    run_case_with(ops, Model::new())
}

fn run_case_with(ops: Vec<Op>, mut model: Model) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let t = common::open().await;
        let store = t.store.clone();
        let accounts: Vec<AccountId> = store
            .write(|tx| {
                (0..ACCOUNTS)
                    .map(|i| {
                        let flags = if i == 0 {
                            AccountFlags::NONE
                        } else {
                            AccountFlags::NEVER_NEGATIVE
                        };
                        ledger::open_account(tx, &format!("acct-{i}"), Currency::INR, flags)
                    })
                    .collect::<Result<Vec<_>, LedgerOpError>>()
            })
            .await
            .unwrap();
        let mut pending_ids: Vec<TransferId> = Vec::new();

        for (step, op) in ops.iter().enumerate() {
            let op = &match *op {
                Op::Exact { d, c, delta, key } => Op::Single {
                    d,
                    c,
                    amount: (model.available(d) + delta).max(1),
                    key,
                },
                ref other => other.clone(),
            };
            let expected = model.apply(op);
            let key = |k: u8| format!("k{k}");
            let pending_id = |p: usize| {
                let p = p % (pending_ids.len() + 1);
                pending_ids.get(p).copied().unwrap_or(TransferId(1 << 40))
            };
            let req = match *op {
                Op::Single {
                    d,
                    c,
                    amount,
                    key: k,
                } => Some(TransferRequest {
                    scope: "test".into(),
                    key: key(k),
                    op: TransferOp::Single {
                        debit: accounts[d],
                        credit: accounts[c],
                        currency: Currency::INR,
                        amount: Money::from_minor(amount),
                    },
                }),
                Op::Reserve {
                    d,
                    c,
                    amount,
                    timeout_s,
                    key: k,
                } => Some(TransferRequest {
                    scope: "test".into(),
                    key: key(k),
                    op: TransferOp::Reserve {
                        debit: accounts[d],
                        credit: accounts[c],
                        currency: Currency::INR,
                        amount: Money::from_minor(amount),
                        timeout: timeout_s.map(Duration::from_secs),
                    },
                }),
                Op::Post { p, amount, key: k } => Some(TransferRequest {
                    scope: "test".into(),
                    key: key(k),
                    op: TransferOp::Post {
                        pending: pending_id(p),
                        amount: Money::from_minor(amount),
                    },
                }),
                Op::Void { p, key: k } => Some(TransferRequest {
                    scope: "test".into(),
                    key: key(k),
                    op: TransferOp::Void {
                        pending: pending_id(p),
                    },
                }),
                Op::Advance { .. } => None,
                Op::Exact { .. } => unreachable!(),
            };
            let actual = match (req, op) {
                (Some(req), _) => {
                    let r = store.write(move |tx| ledger::transfer(tx, &req)).await;
                    match r {
                        Ok(t) => {
                            if matches!(op, Op::Reserve { .. }) && !t.replayed {
                                pending_ids.push(t.record.id);
                            }
                            Answer::Done {
                                replayed: t.replayed,
                            }
                        }
                        Err(LedgerOpError::Rejected(e)) => Answer::Refused(refusal(&e)),
                        Err(LedgerOpError::Store(e)) => panic!("store error: {e:?}"),
                    }
                }
                (None, Op::Advance { s }) => {
                    let s = *s as i64;
                    store
                        .write(move |tx| {
                            sandbox::advance_clock(tx, s)?;
                            // Folding changes where totals are kept, never what they are.
                            ledger::fold_deltas(tx, None, 1_000)?;
                            ledger::expire_due(tx, 1_000, ledger::Held::Wait, None)
                        })
                        .await
                        .map_err(|e: StoreError| panic!("{e:?}"))
                        .ok();
                    Answer::Done { replayed: false }
                }
                _ => unreachable!(),
            };
            prop_assert_eq!(&actual, &expected, "step {}: {:?}", step, op);

            let accounts = accounts.clone();
            let (balances, verification) = store
                .read(move |tx| {
                    let mut b = Vec::new();
                    for a in &accounts {
                        b.push(ledger::account(tx, *a)?.unwrap().balances);
                    }
                    Ok::<_, StoreError>((b, ledger::verify(tx)?))
                })
                .await
                .unwrap();
            prop_assert_eq!(
                &balances[..],
                &model.balances[..],
                "balances after step {}: {:?}",
                step,
                op
            );
            prop_assert!(
                verification.ok(),
                "verify after step {}: {:?}",
                step,
                verification.problems
            );
            for (i, b) in balances.iter().enumerate() {
                if i != 0 {
                    prop_assert!(b.available().minor() >= 0, "account {} went negative", i);
                }
            }
        }
        store.close().await;
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn ledger_agrees_with_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        run_case(ops)?;
    }
}

/// Guards against a harness that compares nothing: each planted flaw must
/// fail a case the true model passes, one through the answers and one
/// through the balances.
#[test]
fn the_model_test_can_fail() {
    let overdraw = vec![Op::Single {
        d: 1,
        c: 2,
        amount: 100,
        key: 1,
    }];
    assert!(run_case(overdraw.clone()).is_ok());
    assert!(run_case_with(overdraw, Model::with(Flaw::Overdraws)).is_err());
    // From the unflagged account 0, so the store makes the transfer too.
    let transfer = vec![Op::Single {
        d: 0,
        c: 1,
        amount: 100,
        key: 1,
    }];
    assert!(run_case(transfer.clone()).is_ok());
    let caught = run_case_with(transfer, Model::with(Flaw::CreditsTwice));
    assert!(
        caught
            .as_ref()
            .is_err_and(|e| e.to_string().contains("balances after step 0")),
        "{caught:?}"
    );
}
