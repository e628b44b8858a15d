//! The README's status code table lists exactly the codes the rail answers.

use payrail_mobikwik::wire::Code;

#[test]
fn readme_status_table_matches_the_code() {
    let readme = include_str!("../../../../README.md");
    let table = readme
        .split("Status codes:")
        .nth(1)
        .expect("a 'Status codes:' section");
    let documented: Vec<u16> = table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.split('|').nth(1)?.trim().parse().ok())
        .collect();
    let mut answered: Vec<u16> = Code::ALL.iter().map(|c| c.number()).collect();
    answered.sort_unstable();
    assert_eq!(documented, answered);
}
