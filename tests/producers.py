"""SQLite files as real edge producers write them: their exact CREATE TABLE statements
and value formats, read from each producer's source (cited beside each builder).

Each builder is `make_<producer>(path, rows, start=0)`: it creates the file when it does
not exist and appends `rows` rows numbered from `start`, as the producer would.
"""

import datetime as dt
import os
import sqlite3

# weewx 5, src/schemas/wview_extended.py (the default archive schema), created by
# src/weedb/__init__.py Cursor.create_table: "CREATE TABLE {table} ({col type, ...});".
# dateTime is epoch seconds of the end of each archive interval, the table's key.
WEEWX_REAL_COLUMNS = (
    "altimeter appTemp appTemp1 barometer batteryStatus1 batteryStatus2 batteryStatus3 "
    "batteryStatus4 batteryStatus5 batteryStatus6 batteryStatus7 batteryStatus8 cloudbase "
    "co co2 consBatteryVoltage dewpoint dewpoint1 ET extraHumid1 extraHumid2 extraHumid3 "
    "extraHumid4 extraHumid5 extraHumid6 extraHumid7 extraHumid8 extraTemp1 extraTemp2 "
    "extraTemp3 extraTemp4 extraTemp5 extraTemp6 extraTemp7 extraTemp8 forecast hail "
    "hailBatteryStatus hailRate heatindex heatindex1 heatingTemp heatingVoltage humidex "
    "humidex1 illuminance inDewpoint inHumidity inTemp inTempBatteryStatus leafTemp1 "
    "leafTemp2 leafWet1 leafWet2 lightning_distance lightning_disturber_count "
    "lightning_energy lightning_noise_count lightning_strike_count luminosity maxSolarRad "
    "nh3 no2 noise o3 outHumidity outTemp outTempBatteryStatus pb pm10_0 pm1_0 pm2_5 "
    "pressure radiation rain rainBatteryStatus rainRate referenceVoltage rxCheckPercent "
    "signal1 signal2 signal3 signal4 signal5 signal6 signal7 signal8 snow "
    "snowBatteryStatus snowDepth snowMoisture snowRate so2 soilMoist1 soilMoist2 "
    "soilMoist3 soilMoist4 soilTemp1 soilTemp2 soilTemp3 soilTemp4 supplyVoltage "
    "txBatteryStatus UV uvBatteryStatus windBatteryStatus windchill windDir windGust "
    "windGustDir windrun windSpeed").split()
WEEWX_DDL = ("CREATE TABLE archive (dateTime INTEGER NOT NULL UNIQUE PRIMARY KEY, "
             "usUnits INTEGER NOT NULL, interval INTEGER NOT NULL, "
             + ", ".join(f"{c} REAL" for c in WEEWX_REAL_COLUMNS) + ");")
WEEWX_START = 1_700_000_100  # an archive record every 300 s, stamped at its end
WEEWX_MEASURED = ("outTemp", "outHumidity", "barometer", "windSpeed", "windDir", "rain",
                  "inTemp", "dewpoint")  # what a Vantage-like station fills; the rest NULL


def weewx_row(i):
    """Archive record i: US units (usUnits 1), 5-minute interval, a few sensors."""
    values = {"outTemp": 50.0 + (i % 40) * 0.25, "outHumidity": 60.0 + i % 30,
              "barometer": 29.9 + (i % 10) * 0.01, "windSpeed": float(i % 12),
              "windDir": None if i % 12 == 0 else float(i * 37 % 360), "rain": 0.0,
              "inTemp": 68.5, "dewpoint": 40.0 + (i % 20) * 0.5}
    return (WEEWX_START + 300 * i, 1, 5) + tuple(values.get(c) for c in WEEWX_REAL_COLUMNS)


def make_weewx(path, rows, start=0):
    """weewx.sdb's archive table."""
    return build(path, WEEWX_DDL, "archive", [weewx_row(i) for i in range(start, start + rows)])


# Home Assistant recorder, homeassistant/components/recorder/db_schema.py (schema 41),
# as SQLAlchemy compiles it for SQLite (checked with sqlalchemy's CreateTable): time is
# epoch seconds in FLOAT *_ts columns; the legacy last_changed / last_updated columns
# are always NULL. A database created by an older release keeps them as DATETIME
# (HA_STATES_LEGACY_DDL); a fresh one gets CHAR(0). last_changed_ts is NULL when the
# state did not change (States.from_event). state_id has no AUTOINCREMENT.
HA_STATES_DDL = """CREATE TABLE states (
\tstate_id INTEGER NOT NULL, 
\tentity_id CHAR(0), 
\tstate VARCHAR(255), 
\tattributes CHAR(0), 
\tevent_id SMALLINT, 
\tlast_changed {legacy}, 
\tlast_changed_ts FLOAT, 
\tlast_updated {legacy}, 
\tlast_updated_ts FLOAT, 
\told_state_id INTEGER, 
\tattributes_id INTEGER, 
\tcontext_id CHAR(0), 
\tcontext_user_id CHAR(0), 
\tcontext_parent_id CHAR(0), 
\torigin_idx SMALLINT, 
\tcontext_id_bin BLOB, 
\tcontext_user_id_bin BLOB, 
\tcontext_parent_id_bin BLOB, 
\tmetadata_id INTEGER, 
\tPRIMARY KEY (state_id), 
\tFOREIGN KEY(old_state_id) REFERENCES states (state_id), 
\tFOREIGN KEY(attributes_id) REFERENCES state_attributes (attributes_id), 
\tFOREIGN KEY(metadata_id) REFERENCES states_meta (metadata_id)
);
CREATE INDEX ix_states_old_state_id ON states (old_state_id);
CREATE INDEX ix_states_attributes_id ON states (attributes_id);
CREATE INDEX ix_states_context_id_bin ON states (context_id_bin);
CREATE INDEX ix_states_metadata_id_last_updated_ts ON states (metadata_id, last_updated_ts);
CREATE INDEX ix_states_last_updated_ts ON states (last_updated_ts);
"""
HA_STATES_FRESH_DDL = HA_STATES_DDL.format(legacy="CHAR(0)")
HA_STATES_LEGACY_DDL = HA_STATES_DDL.format(legacy="DATETIME")
HA_START = 1_717_000_000.0


def ha_state_row(i):
    """State i of one of 5 entities; every third one a change (last_changed_ts set)."""
    updated = HA_START + i * 1.25 + (i % 7) * 1e-3
    changed = updated - 30.0 if i % 3 == 0 else None
    context = (i * 7919).to_bytes(16, "big")
    return (i + 1, None, f"{20 + i % 10}.{i % 10}", None, None, None, changed, None,
            updated, i - 4 if i >= 5 else None, 1 + i % 5, None, None, None, 0, context,
            None, None, 1 + i % 5)


def make_ha_states(path, rows, start=0, legacy=True):
    """home-assistant_v2.db's states table (legacy DATETIME columns by default)."""
    return build(path, HA_STATES_LEGACY_DDL if legacy else HA_STATES_FRESH_DDL, "states",
                 [ha_state_row(i) for i in range(start, start + rows)])


# The same file's events table (class Events in db_schema.py, schema 41, fresh install):
# time_fired_ts FLOAT indexed, the legacy columns CHAR(0) and always NULL.
HA_EVENTS_DDL = """CREATE TABLE events (
\tevent_id INTEGER NOT NULL, 
\tevent_type CHAR(0), 
\tevent_data CHAR(0), 
\torigin CHAR(0), 
\torigin_idx SMALLINT, 
\ttime_fired CHAR(0), 
\ttime_fired_ts FLOAT, 
\tcontext_id CHAR(0), 
\tcontext_user_id CHAR(0), 
\tcontext_parent_id CHAR(0), 
\tdata_id INTEGER, 
\tcontext_id_bin BLOB, 
\tcontext_user_id_bin BLOB, 
\tcontext_parent_id_bin BLOB, 
\tevent_type_id INTEGER, 
\tPRIMARY KEY (event_id), 
\tFOREIGN KEY(data_id) REFERENCES event_data (data_id), 
\tFOREIGN KEY(event_type_id) REFERENCES event_types (event_type_id)
);
CREATE INDEX ix_events_event_type_id_time_fired_ts ON events (event_type_id, time_fired_ts);
CREATE INDEX ix_events_context_id_bin ON events (context_id_bin);
CREATE INDEX ix_events_time_fired_ts ON events (time_fired_ts);
CREATE INDEX ix_events_data_id ON events (data_id);
"""


def ha_event_row(i):
    """Event i: one of 3 event types, fired 0.4 s apart, with a context id."""
    return (i + 1, None, None, None, 0, None, HA_START + i * 0.4, None, None, None,
            1 + i % 11, (i * 104729).to_bytes(16, "big"), None, None, 1 + i % 3)


def make_ha_events(path, rows, start=0):
    """home-assistant_v2.db's events table."""
    return build(path, HA_EVENTS_DDL, "events",
                 [ha_event_row(i) for i in range(start, start + rows)])


# The recorder's other tables an upload of states needs (db_schema.py, schema 42, as
# SQLAlchemy compiles them for SQLite; the MariaDB dump of the same schema in
# JacobsenKim/ha2mariadb a0_homeassistant_schema_42_tables.sql lists the same columns):
# states_meta names the entity of states.metadata_id; statistics holds an hourly
# mean/min/max per statistics_meta row, unique on (metadata_id, start_ts); FLOAT is
# SQLAlchemy's Float on SQLite, BOOLEAN its Boolean. No table has AUTOINCREMENT.
HA_STATES_META_DDL = """CREATE TABLE states_meta (
\tmetadata_id INTEGER NOT NULL, 
\tentity_id VARCHAR(255), 
\tPRIMARY KEY (metadata_id)
);
CREATE UNIQUE INDEX ix_states_meta_entity_id ON states_meta (entity_id);
"""
HA_STATISTICS_META_DDL = """CREATE TABLE statistics_meta (
\tid INTEGER NOT NULL, 
\tstatistic_id VARCHAR(255), 
\tsource VARCHAR(32), 
\tunit_of_measurement VARCHAR(255), 
\thas_mean BOOLEAN, 
\thas_sum BOOLEAN, 
\tname VARCHAR(255), 
\tPRIMARY KEY (id)
);
CREATE UNIQUE INDEX ix_statistics_meta_statistic_id ON statistics_meta (statistic_id);
"""
HA_STATISTICS_DDL = """CREATE TABLE statistics (
\tid INTEGER NOT NULL, 
\tcreated CHAR(0), 
\tcreated_ts FLOAT, 
\tmetadata_id INTEGER, 
\tstart CHAR(0), 
\tstart_ts FLOAT, 
\tmean FLOAT, 
\tmin FLOAT, 
\tmax FLOAT, 
\tlast_reset CHAR(0), 
\tlast_reset_ts FLOAT, 
\tstate FLOAT, 
\tsum FLOAT, 
\tPRIMARY KEY (id), 
\tFOREIGN KEY(metadata_id) REFERENCES statistics_meta (id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX ix_statistics_statistic_id_start_ts ON statistics (metadata_id, start_ts);
"""
HA_ENTITIES = 5  # states.metadata_id is 1 + i % 5 (ha_state_row)
HA_RECORDER_TABLES = ("states", "states_meta", "statistics", "statistics_meta")


def ha_statistic_row(i):
    """Hour i's statistics of sensor 1 + i % 2, written 10 s after the hour closed."""
    start = HA_START + 3600 * (i // 2)
    return (i + 1, None, start + 3610.0, 1 + i % 2, None, start, 20.0 + i % 5,
            18.0 + i % 5, 23.0 + i % 5, None, None, None, None)


def make_ha_recorder(path, rows, start=0):
    """home-assistant_v2.db with the four tables an analysis of states needs: `rows`
    states (and the statistics of rows // 10 hours) from `start` on; the meta tables
    are written with the file, as the recorder registers entities before their states."""
    new = not os.path.exists(path)
    make_ha_states(path, rows, start, legacy=False)
    if new:
        conn = sqlite3.connect(path)
        with conn:
            conn.executescript(HA_STATES_META_DDL + HA_STATISTICS_META_DDL +
                               HA_STATISTICS_DDL)
            conn.executemany("INSERT INTO states_meta VALUES (?, ?)", [
                (k, f"sensor.room_{k}_temperature") for k in range(1, HA_ENTITIES + 1)])
            conn.executemany("INSERT INTO statistics_meta VALUES (?, ?, ?, ?, ?, ?, ?)", [
                (k, f"sensor.room_{k}_temperature", "recorder", "°C", 1, 0, None)
                for k in (1, 2)])
        conn.close()
    first, count = start // 10, (start + rows) // 10 - start // 10
    return build(path, "", "statistics",
                 [ha_statistic_row(i) for i in range(first, first + count)])


# The sqlite3 shell's `.import --csv data.csv readings` into a new table: every column
# TEXT, named from the CSV header (sqlite src/shell.c.in, do_meta_command ".import";
# the exact text checked with sqlite3 3.40.1). Dates as a US spreadsheet writes them.
CSV_IMPORT_DDL = ('CREATE TABLE "readings"(\n"Date" TEXT, "Temperature" TEXT, '
                  '"Humidity" TEXT)')
CSV_START = dt.datetime(2019, 12, 30, 22, 0)


def csv_row(i):
    """Line i of the CSV: an hourly reading stamped '%m/%d/%Y %H:%M' (local time)."""
    moment = CSV_START + dt.timedelta(hours=i)
    return (moment.strftime("%m/%d/%Y %H:%M"), f"{18 + (i % 50) / 10:.1f}", str(40 + i % 9))


def make_csv_import(path, rows, start=0):
    """A CSV imported with the sqlite3 shell (appending more lines to the same table)."""
    return build(path, CSV_IMPORT_DDL, "readings",
                 [csv_row(i) for i in range(start, start + rows)])


# Telegraf outputs.sql with driver "sqlite" (plugins/outputs/sql/sql.go, default
# table_template "CREATE TABLE {TABLE}({COLUMNS})"; exact text in sqlite_test.go):
# a quoted column per tag and field, no key, time as RFC 3339 text in UTC.
TELEGRAF_DDL = ('CREATE TABLE "cpu"("timestamp" TIMESTAMP,"cpu" TEXT,"host" TEXT,'
                '"usage_idle" DOUBLE,"usage_user" DOUBLE)')
TELEGRAF_START = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)


def telegraf_row(i):
    """Metric i: every 10 s, 4 CPUs reported with the same timestamp."""
    moment = TELEGRAF_START + dt.timedelta(seconds=10 * (i // 4))
    return (moment.strftime("%Y-%m-%dT%H:%M:%SZ"), f"cpu{i % 4}", "edge-01",
            90.0 - i % 13, 5.0 + i % 7)


def make_telegraf(path, rows, start=0):
    """Telegraf's cpu measurement table."""
    return build(path, TELEGRAF_DDL, "cpu", [telegraf_row(i) for i in range(start, start + rows)])


def build(path, ddl, table, rows):
    """Create the file with `ddl` when it is new, then append `rows` in one commit."""
    new = not os.path.exists(path)
    conn = sqlite3.connect(path)
    try:
        if new:
            conn.executescript(ddl)
        if rows:
            marks = ", ".join("?" * len(rows[0]))
            conn.executemany(f'INSERT INTO "{table}" VALUES ({marks})', rows)
        conn.commit()
    finally:
        conn.close()
    return path
