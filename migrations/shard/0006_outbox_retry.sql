-- phase: expand
-- Events RabbitMQ refuses (a company's full queue set to reject-publish) move to an outbox row
-- of their own that records how often they were refused (`tries`) and when to try them again
-- (`not_before`: 1 s after the first refusal, doubling to 60 s). Kept in the row, the wait holds
-- for every relay of the shard, not just the one that was refused. Old relays ignore both
-- columns; a constant default adds them without rewriting the table.
ALTER TABLE outbox
    ADD COLUMN tries integer NOT NULL DEFAULT 0,
    ADD COLUMN not_before timestamptz;
