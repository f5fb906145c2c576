from tests.conftest import Stack


async def test_whoami_as_admin(stack: Stack) -> None:
    async with stack.client(stack.admin) as c:
        me = await c.whoami()
    assert me["name"] == "admin"
    assert me["role"] == "admin"
    assert me["org"] == "operators"
    assert me["key_id"] == stack.admin.key_id
