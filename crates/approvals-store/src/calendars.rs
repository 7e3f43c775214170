//! Change calendars (issue 26): one row per calendar, its JSON document beside its name; each
//! use case one transaction.

use approvals_domain::{DomainError, State, Timestamp, calendar::CalendarRecord};
use sea_orm::{
    ConnectionTrait, QueryResult, SqlErr,
    sea_query::{Expr, ExprTrait, Order, Query, SelectStatement},
};

use crate::{
    Store,
    error::StoreError,
    schema::{CALENDARS, CHANGE_REQUESTS, cal, cr},
    write::WriteTxn,
};

/// In the transaction that changes a calendar: every scheduled request whose snapshot names a
/// calendar becomes due at `now`, so the apply worker's sweep (one replica per request, under
/// its row lock) re-checks its schedule against the calendars as they now stand: suspends the
/// ones a new closed window covers, resumes the ones it no longer covers (one event each).
/// The body test is a cheap over-approximation (a false match is re-checked and left alone).
async fn recheck_schedules(w: &WriteTxn<'_>, now: Timestamp) -> Result<(), StoreError> {
    let update = Query::update()
        .table(CHANGE_REQUESTS)
        .value(cr::DUE_TIME, now.as_micros())
        .and_where(Expr::col(cr::STATE).eq(State::Scheduled.as_str()))
        .and_where(Expr::col(cr::BODY).like("%\"calendars\":[%"))
        .to_owned();
    w.txn.execute(&update).await?;
    Ok(())
}

const COLUMNS: [&str; 2] = [cal::REVISION, cal::BODY];

fn select_calendar(name: &str) -> SelectStatement {
    Query::select()
        .columns(COLUMNS)
        .from(CALENDARS)
        .and_where(Expr::col(cal::NAME).eq(name))
        .to_owned()
}

fn decode(row: &QueryResult) -> Result<CalendarRecord, StoreError> {
    let body: String = row.try_get("", cal::BODY)?;
    let mut calendar: CalendarRecord = serde_json::from_str(&body)?;
    calendar.revision = row.try_get("", cal::REVISION)?;
    Ok(calendar)
}

impl Store {
    /// Stores a new calendar; its name must be new.
    pub async fn create_calendar(
        &self,
        mut calendar: CalendarRecord,
    ) -> Result<CalendarRecord, StoreError> {
        calendar.revision = 1;
        self.write(async |w| {
            if w.txn
                .query_one(&select_calendar(&calendar.name))
                .await?
                .is_some()
            {
                return Err(StoreError::CalendarNameTaken(calendar.name.clone()));
            }
            let insert = Query::insert()
                .into_table(CALENDARS)
                .columns([
                    cal::NAME,
                    cal::REVISION,
                    cal::CREATE_TIME,
                    cal::UPDATE_TIME,
                    cal::BODY,
                ])
                .values_panic([
                    calendar.name.clone().into(),
                    calendar.revision.into(),
                    calendar.create_time.as_micros().into(),
                    calendar.update_time.as_micros().into(),
                    serde_json::to_string(&calendar)?.into(),
                ])
                .to_owned();
            w.txn.execute(&insert).await.map_err(|err| {
                // A concurrent create won the race for the name.
                if matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) {
                    StoreError::CalendarNameTaken(calendar.name.clone())
                } else {
                    err.into()
                }
            })?;
            recheck_schedules(w, calendar.update_time).await
        })
        .await?;
        Ok(calendar)
    }

    pub async fn get_calendar(&self, name: &str) -> Result<CalendarRecord, StoreError> {
        match self.db.query_one(&select_calendar(name)).await? {
            Some(row) => decode(&row),
            None => Err(StoreError::CalendarNotFound(name.to_owned())),
        }
    }

    /// One page of calendars ordered by name, after the name `after`.
    pub async fn list_calendars(
        &self,
        after: Option<&str>,
        page_size: u64,
    ) -> Result<(Vec<CalendarRecord>, Option<String>), StoreError> {
        let mut query = Query::select();
        query.columns(COLUMNS).from(CALENDARS);
        if let Some(after) = after {
            query.and_where(Expr::col(cal::NAME).gt(after));
        }
        query.order_by(cal::NAME, Order::Asc).limit(page_size + 1);
        let rows = self.db.query_all(&query).await?;
        let mut calendars = rows.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
        let next = if calendars.len() as u64 > page_size {
            calendars.truncate(page_size as usize);
            calendars.last().map(|c| c.name.clone())
        } else {
            None
        };
        Ok((calendars, next))
    }

    /// Runs `edit` on the named calendar in one transaction (row locked) and stores the result
    /// with the next revision. A refused edit writes nothing.
    pub async fn update_calendar<F>(
        &self,
        name: &str,
        edit: F,
    ) -> Result<CalendarRecord, StoreError>
    where
        F: FnOnce(&mut CalendarRecord) -> Result<(), DomainError> + Send,
    {
        self.write(async |w| {
            let row = w
                .txn
                .query_one(&w.lock(select_calendar(name)))
                .await?
                .ok_or_else(|| StoreError::CalendarNotFound(name.to_owned()))?;
            let mut calendar = decode(&row)?;
            let previous = calendar.revision;
            let create_time = calendar.create_time;
            edit(&mut calendar)?;
            calendar.name = name.to_owned();
            calendar.create_time = create_time;
            calendar.revision = previous + 1;
            let update = Query::update()
                .table(CALENDARS)
                .value(cal::REVISION, calendar.revision)
                .value(cal::UPDATE_TIME, calendar.update_time.as_micros())
                .value(cal::BODY, serde_json::to_string(&calendar)?)
                .and_where(Expr::col(cal::NAME).eq(name))
                .and_where(Expr::col(cal::REVISION).eq(previous))
                .to_owned();
            let updated = w.txn.execute(&update).await?;
            if updated.rows_affected() != 1 {
                return Err(StoreError::Internal(format!(
                    "calendar {name} changed during the transaction"
                )));
            }
            recheck_schedules(w, calendar.update_time).await?;
            Ok(calendar)
        })
        .await
    }

    /// Deletes the named calendar once `check` accepts it (a stale etag refused); the
    /// schedules it held are re-checked from `now`.
    pub async fn delete_calendar<F>(
        &self,
        name: &str,
        now: Timestamp,
        check: F,
    ) -> Result<(), StoreError>
    where
        F: FnOnce(&CalendarRecord) -> Result<(), DomainError> + Send,
    {
        self.write(async |w| {
            let row = w
                .txn
                .query_one(&w.lock(select_calendar(name)))
                .await?
                .ok_or_else(|| StoreError::CalendarNotFound(name.to_owned()))?;
            check(&decode(&row)?)?;
            let delete = Query::delete()
                .from_table(CALENDARS)
                .and_where(Expr::col(cal::NAME).eq(name))
                .to_owned();
            if w.txn.execute(&delete).await?.rows_affected() == 0 {
                return Err(StoreError::CalendarNotFound(name.to_owned()));
            }
            recheck_schedules(w, now).await
        })
        .await
    }

    /// The stored calendars among `names` (those that exist), in the order of `names`.
    pub async fn calendars_named(
        &self,
        names: &[String],
    ) -> Result<Vec<CalendarRecord>, StoreError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let query = Query::select()
            .columns(COLUMNS)
            .from(CALENDARS)
            .and_where(Expr::col(cal::NAME).is_in(names.iter().map(String::as_str)))
            .to_owned();
        let mut found = self
            .db
            .query_all(&query)
            .await?
            .iter()
            .map(decode)
            .collect::<Result<Vec<_>, _>>()?;
        found.sort_by_key(|c| names.iter().position(|n| *n == c.name));
        Ok(found)
    }
}
