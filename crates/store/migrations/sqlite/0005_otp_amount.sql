-- The amount an OTP was requested for, in minor units: a debit that presents
-- the OTP may not exceed it. NULL for OTPs issued before this column existed;
-- those cannot authorise a debit.
ALTER TABLE mbk_otps ADD COLUMN amount INTEGER;
