-- The Mobikwik-style wallet rail.

CREATE TABLE mbk_merchants (
    mid                 TEXT    PRIMARY KEY,
    name                TEXT    NOT NULL,
    -- Shared HMAC secrets, sealed with the master key.
    secret_sealed       BLOB    NOT NULL,
    regen_secret_sealed BLOB,
    -- Space-separated aggregated merchant ids this merchant may sign for.
    aggregated_ids      TEXT    NOT NULL,
    account_id          INTEGER NOT NULL REFERENCES accounts (id),
    created_at          INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE wallets (
    cell       TEXT    PRIMARY KEY,
    account_id INTEGER NOT NULL UNIQUE REFERENCES accounts (id),
    email      TEXT,
    blocked    INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;

-- Wallet tokens, by SHA-256 of the token; the token itself is never stored.
CREATE TABLE mbk_tokens (
    digest      BLOB    PRIMARY KEY,
    mid         TEXT    NOT NULL,
    cell        TEXT    NOT NULL,
    cap         INTEGER NOT NULL,
    -- Digest of the first token of the chain this one was regenerated from.
    lineage     BLOB    NOT NULL,
    regenerated INTEGER NOT NULL,
    -- 0 active, 1 replaced by a regeneration
    state       INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX mbk_tokens_by_lineage ON mbk_tokens (lineage, created_at);

-- One-time passwords, as keyed digests.
CREATE TABLE mbk_otps (
    id              INTEGER PRIMARY KEY,
    mid             TEXT    NOT NULL,
    cell            TEXT    NOT NULL,
    digest          BLOB    NOT NULL,
    failed_attempts INTEGER NOT NULL DEFAULT 0,
    -- 0 open, 1 used, 2 superseded by a newer OTP, 3 locked after failures
    state           INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL
);
CREATE INDEX mbk_otps_by_cell ON mbk_otps (cell, created_at);

CREATE TABLE mbk_coupons (
    code         TEXT    PRIMARY KEY,
    basis_points INTEGER NOT NULL CHECK (basis_points BETWEEN 0 AND 10000),
    created_at   INTEGER NOT NULL
) WITHOUT ROWID;

-- Successful debits. The primary key is what makes a repeated orderid
-- impossible to debit twice, whichever node and whatever race.
CREATE TABLE mbk_orders (
    mid               TEXT    NOT NULL,
    orderid           TEXT    NOT NULL,
    txnid             TEXT    NOT NULL UNIQUE,
    cell              TEXT    NOT NULL,
    amount            INTEGER NOT NULL,
    cashback          INTEGER NOT NULL,
    coupon            TEXT,
    aggregated_id     TEXT,
    refunded          INTEGER NOT NULL DEFAULT 0,
    refunded_cashback INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    PRIMARY KEY (mid, orderid),
    CHECK (refunded >= 0 AND refunded <= amount),
    CHECK (refunded_cashback >= 0 AND refunded_cashback <= cashback)
);

CREATE TABLE mbk_refunds (
    mid        TEXT    NOT NULL,
    refundid   TEXT    NOT NULL,
    orderid    TEXT    NOT NULL,
    amount     INTEGER NOT NULL,
    refid      TEXT    NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (mid, refundid),
    FOREIGN KEY (mid, orderid) REFERENCES mbk_orders (mid, orderid)
);
