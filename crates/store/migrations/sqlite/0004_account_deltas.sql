-- Changes to account totals that no rule can refuse (credits, releases),
-- kept per writer connection. SQLite has one writer, which applies them to the
-- accounts directly, so this table stays empty there; it exists so that both
-- engines read balances with the same queries.
CREATE TABLE account_deltas (
    account_id      INTEGER NOT NULL REFERENCES accounts (id),
    writer_id       INTEGER NOT NULL,
    debits_pending  INTEGER NOT NULL,
    debits_posted   INTEGER NOT NULL,
    credits_pending INTEGER NOT NULL,
    credits_posted  INTEGER NOT NULL,
    PRIMARY KEY (account_id, writer_id)
) WITHOUT ROWID;
