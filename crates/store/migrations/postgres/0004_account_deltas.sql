-- Changes to account totals that no rule can refuse (credits, releases),
-- kept per writer connection: each writer adds its batch's changes to its own
-- row, so writers on any number of nodes never wait on each other for a hot
-- account (a merchant credited by every debit). An account's totals are its
-- row plus its delta rows; deltas are folded into the account row in the
-- background. Every delta only raises what the account has available, so a
-- check that misses a concurrent one is conservative, never an overdraft.
CREATE TABLE account_deltas (
    account_id      BIGINT NOT NULL REFERENCES accounts (id),
    writer_id       BIGINT NOT NULL,
    debits_pending  BIGINT NOT NULL,
    debits_posted   BIGINT NOT NULL,
    credits_pending BIGINT NOT NULL,
    credits_posted  BIGINT NOT NULL,
    PRIMARY KEY (account_id, writer_id)
);
