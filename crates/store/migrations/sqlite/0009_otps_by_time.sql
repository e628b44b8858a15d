-- OTPs are pruned by age (`mobikwik::prune_otps`), oldest first.
CREATE INDEX mbk_otps_by_created_at ON mbk_otps (created_at);
