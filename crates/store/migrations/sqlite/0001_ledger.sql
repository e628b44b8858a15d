-- The double-entry ledger. Balances are four running totals per account, kept
-- equal to the sums of the transfers that touch it (checked by verify).

CREATE TABLE accounts (
    id              INTEGER PRIMARY KEY,
    code            TEXT    NOT NULL UNIQUE,
    currency        TEXT    NOT NULL,
    flags           INTEGER NOT NULL,
    debits_pending  INTEGER NOT NULL DEFAULT 0,
    debits_posted   INTEGER NOT NULL DEFAULT 0,
    credits_pending INTEGER NOT NULL DEFAULT 0,
    credits_posted  INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    -- Target of the transfers' (account, currency) foreign keys: a transfer
    -- can only move money between accounts of its own currency.
    UNIQUE (id, currency)
);

CREATE TABLE transfers (
    id             INTEGER PRIMARY KEY,
    scope          TEXT    NOT NULL,
    idem_key       TEXT    NOT NULL,
    kind           INTEGER NOT NULL,
    debit_account  INTEGER NOT NULL,
    credit_account INTEGER NOT NULL,
    currency       TEXT    NOT NULL,
    amount         INTEGER NOT NULL CHECK (amount >= 0),
    pending_id     INTEGER REFERENCES transfers (id),
    state          INTEGER NOT NULL DEFAULT 0,
    timeout_ms     INTEGER,
    expires_at     INTEGER,
    created_at     INTEGER NOT NULL,
    -- Idempotency is enforced here, by the database, not by a lookup.
    UNIQUE (scope, idem_key),
    FOREIGN KEY (debit_account, currency) REFERENCES accounts (id, currency),
    FOREIGN KEY (credit_account, currency) REFERENCES accounts (id, currency),
    CHECK (debit_account <> credit_account)
);

-- A reservation is posted, voided or expired at most once.
CREATE UNIQUE INDEX transfers_resolve_once ON transfers (pending_id) WHERE pending_id IS NOT NULL;
-- Open reservations by expiry, for the expiry sweep.
CREATE INDEX transfers_open_by_expiry ON transfers (expires_at) WHERE kind = 1 AND state = 0;
