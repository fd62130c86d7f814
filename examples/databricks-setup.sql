-- databricks-setup.sql: prepare a Unity Catalog workspace for sqlite_to_databricks_uploader.py
--
-- Run once, as a user who may create catalogs (or ask an admin to), in the Databricks
-- SQL editor or with any SQL client. Every statement is idempotent (IF NOT EXISTS, and
-- GRANT of a privilege already held is a no-op), so running it again is safe.
--
-- Edit before running:
--   * the catalog `sensors` and schema `edge` (the uploader's DATABRICKS_DATABASE, here
--     sensors.edge), everywhere below,
--   * the service principal `00000000-0000-0000-0000-000000000000`: the application id
--     of the principal whose OAuth secret (DATABRICKS_CLIENT_ID / DATABRICKS_CLIENT_SECRET)
--     or token (DATABRICKS_TOKEN) the edge hosts use.
--
-- The uploader creates a missing target table itself when it holds CREATE TABLE on the
-- schema. Creating the tables here instead lets you grant it less (SELECT and MODIFY on
-- four tables) and review the schema first.
--
-- The CREATE TABLE statements are the uploader's own DDL for the Bacalhau sensor schema
-- (table sensor_readings), generated with:
--
--   uv run sqlite_to_databricks_uploader.py --demo
--   uv run sqlite_to_databricks_uploader.py --print-ddl --sqlite demo/sensor_data.db \
--       --databricks-database sensors.edge
--   uv run sqlite_to_databricks_uploader.py --print-ddl --sqlite demo/sensor_data.db \
--       --databricks-database sensors.edge \
--       --enable-filter --filter-config '{"status_code": 0}'
--   SANITIZE_HASH_KEY=any uv run sqlite_to_databricks_uploader.py --print-ddl \
--       --sqlite demo/sensor_data.db --databricks-database sensors.edge \
--       --enable-sanitize --sanitize-config \
--       '{"serial_number": {"hash": true}, "latitude": {"round": 2}, "longitude": {"round": 2}}'
--   uv run sqlite_to_databricks_uploader.py --print-ddl --sqlite demo/sensor_data.db \
--       --databricks-database sensors.edge \
--       --enable-aggregate --aggregate-config \
--       '{"group_by": ["sensor_id"], "window": "15m", "aggregations": {"temperature": ["avg", "min", "max"], "humidity": "avg", "records": "count"}}'
--
-- Run the same commands against your own SQLite file and processing configs when they
-- differ: the raw_, filtered_ and secure_ tables have the source's columns (minus any
-- column sanitize drops), and the aggregated_ table's columns follow aggregate_config.
-- Every table ends with the lineage columns _source_id, _batch_id, _uploaded_at,
-- _rescued_data and _source_file, which the uploader needs (exactly-once writes,
-- rescued values, the SQLite file of each row).


-- 1. Catalog and schema ------------------------------------------------------------
-- When the metastore has no default storage root, add MANAGED LOCATION 's3://...' (or
-- abfss://..., gs://...) to CREATE CATALOG, or use an existing catalog instead.

CREATE CATALOG IF NOT EXISTS sensors
COMMENT 'Sensor readings uploaded from edge hosts';

CREATE SCHEMA IF NOT EXISTS sensors.edge
COMMENT 'Tables written by sqlite_to_databricks_uploader.py (one row per reading, tagged with _source_id)';


-- 2. Target tables: one per scenario ------------------------------------------------
-- raw_: no processing (the default).
CREATE TABLE IF NOT EXISTS `sensors`.`edge`.`raw_sensor_readings` (
    `id` BIGINT,
    `timestamp` TIMESTAMP,
    `sensor_id` STRING,
    `temperature` DOUBLE,
    `humidity` DOUBLE,
    `pressure` DOUBLE,
    `vibration` DOUBLE,
    `voltage` DOUBLE,
    `status_code` BIGINT,
    `anomaly_flag` BIGINT,
    `anomaly_type` STRING,
    `firmware_version` STRING,
    `model` STRING,
    `manufacturer` STRING,
    `serial_number` STRING,
    `location` STRING,
    `latitude` DOUBLE,
    `longitude` DOUBLE,
    `original_timezone` STRING,
    `synced` BIGINT,
    `deployment_type` STRING,
    `_source_id` STRING,
    `_batch_id` STRING,
    `_uploaded_at` TIMESTAMP,
    `_rescued_data` STRING,
    `_source_file` STRING
)
USING DELTA
TBLPROPERTIES (
    'delta.enableChangeDataFeed' = 'true',
    'delta.autoOptimize.optimizeWrite' = 'true'
);

-- filtered_: --enable-filter (rows that pass filter_config, same columns as raw_).
CREATE TABLE IF NOT EXISTS `sensors`.`edge`.`filtered_sensor_readings` (
    `id` BIGINT,
    `timestamp` TIMESTAMP,
    `sensor_id` STRING,
    `temperature` DOUBLE,
    `humidity` DOUBLE,
    `pressure` DOUBLE,
    `vibration` DOUBLE,
    `voltage` DOUBLE,
    `status_code` BIGINT,
    `anomaly_flag` BIGINT,
    `anomaly_type` STRING,
    `firmware_version` STRING,
    `model` STRING,
    `manufacturer` STRING,
    `serial_number` STRING,
    `location` STRING,
    `latitude` DOUBLE,
    `longitude` DOUBLE,
    `original_timezone` STRING,
    `synced` BIGINT,
    `deployment_type` STRING,
    `_source_id` STRING,
    `_batch_id` STRING,
    `_uploaded_at` TIMESTAMP,
    `_rescued_data` STRING,
    `_source_file` STRING
)
USING DELTA
TBLPROPERTIES (
    'delta.enableChangeDataFeed' = 'true',
    'delta.autoOptimize.optimizeWrite' = 'true'
);

-- secure_: --enable-sanitize (with or without filter). serial_number holds a keyed
-- hash, latitude/longitude are rounded. A column sanitized with drop would be absent.
CREATE TABLE IF NOT EXISTS `sensors`.`edge`.`secure_sensor_readings` (
    `id` BIGINT,
    `timestamp` TIMESTAMP,
    `sensor_id` STRING,
    `temperature` DOUBLE,
    `humidity` DOUBLE,
    `pressure` DOUBLE,
    `vibration` DOUBLE,
    `voltage` DOUBLE,
    `status_code` BIGINT,
    `anomaly_flag` BIGINT,
    `anomaly_type` STRING,
    `firmware_version` STRING,
    `model` STRING,
    `manufacturer` STRING,
    `serial_number` STRING,
    `location` STRING,
    `latitude` DOUBLE,
    `longitude` DOUBLE,
    `original_timezone` STRING,
    `synced` BIGINT,
    `deployment_type` STRING,
    `_source_id` STRING,
    `_batch_id` STRING,
    `_uploaded_at` TIMESTAMP,
    `_rescued_data` STRING,
    `_source_file` STRING
)
USING DELTA
TBLPROPERTIES (
    'delta.enableChangeDataFeed' = 'true',
    'delta.autoOptimize.optimizeWrite' = 'true'
);

-- aggregated_: --enable-aggregate. One row per sensor and closed 15-minute window.
-- The _sum and _count columns let later queries combine windows exactly.
CREATE TABLE IF NOT EXISTS `sensors`.`edge`.`aggregated_sensor_readings` (
    `sensor_id` STRING,
    `window_start` TIMESTAMP,
    `window_end` TIMESTAMP,
    `temperature_avg` DOUBLE,
    `temperature_min` DOUBLE,
    `temperature_max` DOUBLE,
    `temperature_sum` DOUBLE,
    `temperature_count` BIGINT,
    `humidity_avg` DOUBLE,
    `humidity_sum` DOUBLE,
    `humidity_count` BIGINT,
    `records` BIGINT,
    `_source_id` STRING,
    `_batch_id` STRING,
    `_uploaded_at` TIMESTAMP,
    `_rescued_data` STRING,
    `_source_file` STRING
)
USING DELTA
TBLPROPERTIES (
    'delta.enableChangeDataFeed' = 'true',
    'delta.autoOptimize.optimizeWrite' = 'true'
);


-- 3. Optional: a volume for staging big batches ------------------------------------
-- With DATABRICKS_VOLUME=/Volumes/sensors/edge/staging the uploader sends large batches
-- as Parquet files (PUT into the volume, then COPY INTO, which skips files it loaded
-- before) instead of inline INSERT statements (about 10 times the bytes). Without this
-- section, the uploader creates sensors.edge.uploader_staging itself when it may
-- (DATABRICKS_VOLUME=auto, the default: GRANT CREATE VOLUME ON SCHEMA sensors.edge),
-- and otherwise says so and sends inline statements; DATABRICKS_VOLUME=none: inline
-- statements only.

CREATE VOLUME IF NOT EXISTS sensors.edge.staging
COMMENT 'Parquet files staged by sqlite_to_databricks_uploader.py, removed after COPY INTO';


-- 4. Privileges for the uploader's service principal -------------------------------
-- Least privilege: use the catalog and schema, read and append to the four tables
-- (SELECT is needed too: before re-sending a batch after a crash the uploader asks the
-- table whether the batch landed, and INSERT ... REPLACE WHERE reads its own rows).

GRANT USE CATALOG ON CATALOG sensors TO `00000000-0000-0000-0000-000000000000`;

GRANT USE SCHEMA ON SCHEMA sensors.edge TO `00000000-0000-0000-0000-000000000000`;

GRANT SELECT, MODIFY ON TABLE sensors.edge.raw_sensor_readings
TO `00000000-0000-0000-0000-000000000000`;

GRANT SELECT, MODIFY ON TABLE sensors.edge.filtered_sensor_readings
TO `00000000-0000-0000-0000-000000000000`;

GRANT SELECT, MODIFY ON TABLE sensors.edge.secure_sensor_readings
TO `00000000-0000-0000-0000-000000000000`;

GRANT SELECT, MODIFY ON TABLE sensors.edge.aggregated_sensor_readings
TO `00000000-0000-0000-0000-000000000000`;

-- Only with the staging volume of section 3: PUT needs WRITE VOLUME, COPY INTO reads
-- the staged files with READ VOLUME.
GRANT READ VOLUME, WRITE VOLUME ON VOLUME sensors.edge.staging
TO `00000000-0000-0000-0000-000000000000`;

-- Optional, broader (uncomment to use): let the uploader create its own tables, for a
-- new scenario or base table name, and for --test-upload, which creates and drops a
-- scratch table. Tables it creates are its own, so it can also add columns to them
-- when the SQLite table gains some. The tables created above belong to you: when the
-- source gains a column, the uploader stops with "ask an admin to run: ALTER TABLE ...
-- ADD COLUMNS (...)", which you run (or make the principal the table's owner).
-- GRANT CREATE TABLE ON SCHEMA sensors.edge TO `00000000-0000-0000-0000-000000000000`;
