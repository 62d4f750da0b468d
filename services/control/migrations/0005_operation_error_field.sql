-- The request field an INVALID_ARGUMENT operation failed on, as data
-- (empty for other failures): the API returns it as a google.rpc.BadRequest
-- field violation. Until now it was only inside the message, written
-- `invalid {field}: {message}`; such rows are split once here.
ALTER TABLE operations ADD COLUMN error_field TEXT NOT NULL DEFAULT '';
UPDATE operations
SET error_field = substr(error_message, 9, instr(error_message, ': ') - 9),
    error_message = substr(error_message, instr(error_message, ': ') + 2)
WHERE error_kind = 'invalid_argument' AND error_message LIKE 'invalid %: %';
